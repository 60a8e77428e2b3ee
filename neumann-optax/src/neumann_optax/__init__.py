"""The Neumann optimizer (Krishnan, Xiao & Saurous, arXiv:1712.03298) for JAX, as an optax
``GradientTransformation``: :func:`neumann` and the evaluation weights :func:`evaluation_params`."""

from ._neumann import NeumannState, evaluation_params, neumann

__all__ = ["NeumannState", "evaluation_params", "neumann"]
__version__ = "0.1.0"
