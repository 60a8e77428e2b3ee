"""Thin callbacks for training frameworks: ``integrations.lightning`` (PyTorch Lightning) and
``integrations.transformers`` (the Hugging Face ``Trainer``). Each imports its framework; the
core package never does."""

from __future__ import annotations

from typing import Any

from ..optimizer import Neumann


def unwrap_neumann(optimizer: Any) -> Neumann | None:
    """The Neumann optimizer inside ``optimizer``, through the wrappers frameworks put around it
    (Lightning's ``LightningOptimizer._optimizer``, Accelerate's ``AcceleratedOptimizer.optimizer``,
    DeepSpeed's), or ``None`` if it is another optimizer."""
    for _ in range(4):
        if optimizer is None or isinstance(optimizer, Neumann):
            break
        optimizer = getattr(optimizer, "_optimizer", None) or getattr(optimizer, "optimizer", None)
    return optimizer if isinstance(optimizer, Neumann) else None
