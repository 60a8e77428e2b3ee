"""The Neumann optimizer (Krishnan, Xiao & Saurous, arXiv:1712.03298) for PyTorch."""

from importlib import metadata as _metadata

import torch

from .optimizer import Neumann, ScheduleWarning

__all__ = ["Neumann", "ScheduleWarning", "__version__", "eval_state_dict"]

try:  # the installed distribution's version (pyproject.toml), never a second copy of it
    __version__ = _metadata.version("neumann-optimizer")
except _metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree without installing
    __version__ = "0+unknown"


def eval_state_dict(model: torch.nn.Module, optimizer: Neumann) -> dict[str, torch.Tensor]:
    """A copy of ``model.state_dict()`` with every parameter replaced by its evaluation weight.

    For export: it does not touch the model, works in either optimizer mode, and keeps buffers
    (BatchNorm statistics) as they are; recompute those with ``update_bn`` if they matter.
    """
    weights = optimizer.evaluation_weights()
    by_id = {id(p): w for p, w in weights.items()}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        out[name] = by_id[id(t)] if id(t) in by_id else t.detach().clone()
    return out
