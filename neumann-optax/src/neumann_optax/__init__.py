"""The Neumann optimizer (Krishnan, Xiao & Saurous, arXiv:1712.03298) for JAX, as an optax
``GradientTransformationExtraArgs``: :func:`neumann` and the evaluation weights :func:`evaluation_params`."""

from importlib import metadata as _metadata

from ._neumann import NeumannState, evaluation_params, neumann

__all__ = ["NeumannState", "evaluation_params", "neumann"]
try:  # the installed distribution's version (pyproject.toml), never a second copy of it
    __version__ = _metadata.version("neumann-optax")
except _metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree without installing
    __version__ = "0+unknown"
