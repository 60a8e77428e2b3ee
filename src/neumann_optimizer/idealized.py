"""Algorithm 1 of the paper (SPEC section 4): the idealized two-loop Neumann optimizer.

For deterministic problems. One outer step at ``w``::

    m_0 = -grad f(w)
    m_k = m_{k-1} - grad f(w + eta_in m_{k-1})      k = 1..K
    w  <- w + eta_out m_K

On a quadratic ``f(w) = 1/2 w^T A w - b^T w`` the gradient difference is exact and
``m_K = -sum_{i=0}^{K} (I - eta_in A)^i grad f(w)``: a truncated Neumann series for
``-A^{-1} grad f(w) / eta_in``. Hence ``eta_in m_K`` tends to the Newton step ``-A^{-1} grad f(w)``
when ``0 < eta_in < 1 / lambda_max(A)`` (and ``A`` is positive definite).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

__all__ = ["neumann_direction", "neumann_outer_step"]


def neumann_direction(grad_fn: Callable[[Tensor], Tensor], w: Tensor, inner_lr: float, inner_steps: int) -> Tensor:
    """The inner-loop iterate ``m_K`` of Algorithm 1 at ``w`` (``K = inner_steps >= 0``)."""
    if inner_steps < 0:
        raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
    m = -grad_fn(w)
    for _ in range(inner_steps):
        m = m - grad_fn(w + inner_lr * m)
    return m


def neumann_outer_step(
    grad_fn: Callable[[Tensor], Tensor], w: Tensor, inner_lr: float, outer_lr: float, inner_steps: int
) -> Tensor:
    """One outer step of Algorithm 1: ``w + outer_lr * m_K`` (returns a new tensor)."""
    return w + outer_lr * neumann_direction(grad_fn, w, inner_lr, inner_steps)
