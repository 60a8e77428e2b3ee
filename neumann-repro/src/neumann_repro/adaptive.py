"""Adaptive momentum: our extension of the paper (measured worse than the ramp; compare's
"neumann-adaptive" row), kept with the reproduction rather than in the library: Neumann's
momentum set from the measured curvature of the mini-batch Hessian (the paper's Appendix A)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from neumann_optimizer.diagnostics import hessian_eigenvalues

__all__ = ["AdaptiveMomentum", "momentum_from_curvature"]


def momentum_from_curvature(lambda_min: float, lambda_max: float, mu_min: float = 0.5, mu_max: float = 0.9) -> float:
    """``clip(lambda_max / (|lambda_min| + lambda_max), mu_min, mu_max)`` (Appendix A)."""
    if lambda_max <= 0:
        return mu_min
    mu = lambda_max / (abs(lambda_min) + lambda_max)
    return min(max(mu, mu_min), mu_max)


class AdaptiveMomentum:
    """Our extension (off unless used): set Neumann's momentum from measured curvature.

    Every ``every`` calls of :meth:`update` it estimates the extremal eigenvalues of the Hessian
    of ``loss_fn()`` (the current mini-batch) with ``iterations`` Lanczos steps and sets every
    group's momentum to ``mu = clip(lambda_max / (|lambda_min| + lambda_max), mu_min, mu_max)``
    (a constant pair ``(mu, mu)`` until the next estimate). Cost: ``iterations`` Hessian-vector
    products (about two backward passes each) per estimate.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        every: int,
        *,
        iterations: int = 10,
        mu_min: float = 0.5,
        mu_max: float = 0.9,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.optimizer = optimizer
        self.every = every
        self.iterations = iterations
        self.mu_min, self.mu_max = mu_min, mu_max
        self.calls = 0
        self.history: list[tuple[int, float, float, float]] = []  # (call, lambda_min, lambda_max, mu)

    def update(self, loss_fn: Callable[[], Tensor]) -> float | None:
        """Call once per training step, before ``backward``; returns the new mu when it changed."""
        self.calls += 1
        if (self.calls - 1) % self.every:
            return None
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        spec = hessian_eigenvalues(loss_fn, params, self.iterations, seed=self.calls)
        mu = momentum_from_curvature(spec.lambda_min, spec.lambda_max, self.mu_min, self.mu_max)
        for group in self.optimizer.param_groups:
            group["momentum_bounds"] = (mu, mu)  # a constant mu from the next step on
        self.history.append((self.calls, spec.lambda_min, spec.lambda_max, mu))
        return mu
