"""Curvature diagnostics (SPEC section 5, the paper's Appendix A and Figure 4), and the gradient
noise scale (``neumann_optimizer.noise_scale``, re-exported here).

:func:`hessian_eigenvalues` runs the Lanczos iteration on the Hessian of a scalar loss with
respect to a list of parameters, using Hessian-vector products by double backward, with full
reorthogonalisation. It returns the extremal Ritz values and all of them.

About the shift ``H - lambda_max I`` (the paper's way to the most negative eigenvalue): a Krylov
space does not change under a shift, so in exact arithmetic Lanczos on the shifted operator gives
the same Ritz values moved by ``lambda_max``. What the shifted second run adds is an independent
start vector; since every Ritz value lies inside ``[lambda_min, lambda_max]``, the smaller of the
two estimates of ``lambda_min`` is never the worse one. ``min_via_shift=True`` does that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .noise_scale import NoiseScale, NoiseScaleAccumulator, gradient_noise_scale, register_ddp_noise_scale_hook

__all__ = [
    "HessianSpectrum",
    "NoiseScale",
    "NoiseScaleAccumulator",
    "gradient_noise_scale",
    "hessian_eigenvalues",
    "lanczos",
    "register_ddp_noise_scale_hook",
]


class HessianSpectrum(NamedTuple):
    lambda_min: float
    lambda_max: float
    ritz_values: Tensor  # ascending, float64


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    n: int,
    iterations: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Ritz values (ascending, float64) of a symmetric operator after ``iterations`` Lanczos steps.

    Full reorthogonalisation (twice, classical Gram-Schmidt) keeps the basis orthogonal in
    floating point. Stops early on an invariant subspace.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    k = min(iterations, n)
    q = torch.randn(n, dtype=dtype, device=device, generator=generator)
    q /= q.norm()
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(k):
        w = matvec(basis[j]).to(dtype)
        alpha = torch.dot(w, basis[j])
        w = w - alpha * basis[j] - (betas[-1] * basis[j - 1] if j > 0 else 0.0)
        stacked = torch.stack(basis)
        for _ in range(2):
            w = w - stacked.T @ (stacked @ w)
        alphas.append(float(alpha))
        beta = float(w.norm())
        if j == k - 1 or beta <= 1e-10 * max(1.0, abs(alphas[-1])):
            break
        betas.append(beta)
        basis.append(w / beta)
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(t)


def hessian_eigenvalues(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    iterations: int = 10,
    *,
    min_via_shift: bool = False,
    seed: int = 0,
) -> HessianSpectrum:
    """Extremal eigenvalues of the Hessian of ``loss_fn()`` with respect to ``params``.

    ``loss_fn`` is called once; its graph is kept for the Hessian-vector products (double
    backward). Works for any model and batch, in float32 or float64 (the Lanczos vectors take the
    parameters' dtype; the tridiagonal eigenproblem is solved in float64). The paper uses 10
    iterations on the mini-batch Hessian.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("hessian_eigenvalues: no parameter requires grad")
    with torch.enable_grad():
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, create_graph=True)
    flat_grad = torch.cat([g.reshape(-1) for g in grads])
    n = flat_grad.numel()
    dtype, device = flat_grad.dtype, flat_grad.device
    gen = torch.Generator(device=device).manual_seed(seed)

    def hvp(v: Tensor) -> Tensor:
        hv = torch.autograd.grad(flat_grad, params, grad_outputs=v.to(dtype), retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).detach()

    ritz = lanczos(hvp, n, iterations, dtype=dtype, device=device, generator=gen)
    lam_max, lam_min = float(ritz[-1]), float(ritz[0])
    if min_via_shift:
        shifted = lanczos(lambda v: hvp(v) - lam_max * v, n, iterations, dtype=dtype, device=device, generator=gen)
        lam_min = min(lam_min, float(shifted[0]) + lam_max)
    return HessianSpectrum(lam_min, lam_max, ritz)
