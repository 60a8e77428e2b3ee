"""The gradient noise scale (McCandlish et al. 2018, Appendix A): exact identities, a problem whose
tr(Sigma) and |G|^2 are known in closed form, the accumulator's ratio of means, and the DDP hook
(gloo, 2 and 4 processes) against the single-process estimator on the same samples."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ranks import spawn_ranks
from torch import nn

from neumann_optimizer.diagnostics import NoiseScaleAccumulator, gradient_noise_scale, register_ddp_noise_scale_hook


def test_expected_squared_norms_give_back_the_truth_exactly():
    """E|G_B|^2 = |G|^2 + tr(Sigma)/B: fed the expectations, the estimators return |G|^2 and tr(Sigma)."""
    g2, trace = 0.37, 12.5
    for b_small, b_large in ((1, 2), (4, 64), (32, 1024), (128, 130)):
        est = gradient_noise_scale(g2 + trace / b_small, g2 + trace / b_large, b_small, b_large)
        assert est.grad_sq_norm == pytest.approx(g2, rel=1e-12)
        assert est.trace_sigma == pytest.approx(trace, rel=1e-12)
        assert est.noise_scale == pytest.approx(trace / g2, rel=1e-12)


def _regression(seed: int, d: int, sigma: float):
    """Linear regression, x ~ N(0, I_d), y = x.w* + N(0, sigma^2), loss 1/2 (x.w - y)^2 at w = w* + delta.
    Per-example gradient x (x.delta - eps): G = delta, Sigma = (|delta|^2 + sigma^2) I + delta delta^T."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, generator=g, dtype=torch.float64)
    delta = 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((w_star + delta)[None])

    def grad(n: int) -> torch.Tensor:
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        y = x @ w_star + sigma * torch.randn(n, generator=g, dtype=torch.float64)
        model.zero_grad()
        (0.5 * (model(x).squeeze(1) - y).square().mean()).backward()
        return model.weight.grad.detach().flatten().clone()

    g2 = float(delta.square().sum())
    trace = d * (g2 + sigma**2) + g2
    return grad, g2, trace


@pytest.mark.parametrize(("b_small", "b_large"), [(4, 64), (16, 32)])
def test_linear_regression_with_gaussian_inputs_matches_the_closed_form(b_small, b_large):
    grad, g2, trace = _regression(0, d=8, sigma=0.5)
    acc = NoiseScaleAccumulator(b_small, b_large)
    for _ in range(4000):  # independent batches here; a DDP rank's is a part of the global one (tested below)
        acc.update(grad(b_small).square().sum(), grad(b_large).square().sum())
    est = acc.value
    assert est.grad_sq_norm == pytest.approx(g2, rel=0.08)
    assert est.trace_sigma == pytest.approx(trace, rel=0.05)
    assert est.noise_scale == pytest.approx(trace / g2, rel=0.1)
    # one step alone is far noisier: the |G|^2 estimate of single steps even goes negative
    singles = [
        gradient_noise_scale(grad(b_small).square().sum(), grad(b_large).square().sum(), b_small, b_large)
        for _ in range(200)
    ]
    assert min(s.grad_sq_norm for s in singles) < 0 < max(s.grad_sq_norm for s in singles)


def test_accumulator_divides_the_averages_not_the_ratios():
    steps = [(3.0, 1.0), (5.0, 1.5), (2.5, 0.4)]
    acc = NoiseScaleAccumulator(2, 8)
    for s, l in steps:
        acc.update(s, l)
    parts = [gradient_noise_scale(s, l, 2, 8) for s, l in steps]
    trace = sum(p.trace_sigma for p in parts) / 3
    g2 = sum(p.grad_sq_norm for p in parts) / 3
    assert acc.value.trace_sigma == pytest.approx(trace) and acc.value.grad_sq_norm == pytest.approx(g2)
    assert acc.value.noise_scale == pytest.approx(trace / g2)
    assert acc.value.noise_scale != pytest.approx(sum(p.noise_scale for p in parts) / 3)
    # exponential moving averages, bias-corrected: weights 0.25, 0.5, 1 over the three steps
    ema = NoiseScaleAccumulator(2, 8, decay=0.5)
    for s, l in steps:
        ema.update(torch.tensor(s), torch.tensor(l))  # tensors stay tensors until read
    w = [0.25, 0.5, 1.0]
    assert ema.value.trace_sigma == pytest.approx(
        sum(wi * p.trace_sigma for wi, p in zip(w, parts, strict=True)) / sum(w)
    )
    acc.reset()
    assert acc.steps == 0 and math.isnan(acc.value.noise_scale)


@pytest.mark.parametrize(
    "bad", [dict(small_batch=0, large_batch=4), dict(small_batch=8, large_batch=8), dict(small_batch=4, large_batch=2)]
)
def test_batch_sizes_are_checked(bad):
    with pytest.raises(ValueError, match="small_batch < large_batch"):
        gradient_noise_scale(1.0, 0.5, **bad)
    with pytest.raises(ValueError, match="small_batch < large_batch"):
        NoiseScaleAccumulator(**bad)
    with pytest.raises(ValueError, match="decay"):
        NoiseScaleAccumulator(2, 4, decay=1.0)


# ---------------------------------------------------------------- DDP, gloo
LOCAL, STEPS = 6, 5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batches(world: int):
    g = torch.Generator().manual_seed(3)
    n = LOCAL * world
    return [
        (torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
        for _ in range(STEPS)
    ]


def _ddp_worker(rank: int, world: int, out: str) -> None:
    model = nn.parallel.DistributedDataParallel(_model(), bucket_cap_mb=0.0001)  # several buckets
    state = register_ddp_noise_scale_hook(model, local_batch=LOCAL)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in _batches(world):
        opt.zero_grad()
        sl = slice(rank * LOCAL, (rank + 1) * LOCAL)
        nn.functional.cross_entropy(model(x[sl]), y[sl]).backward()
        opt.step()
    est = state.value()
    grads = [p.grad.clone() for p in model.parameters()]
    if rank == 0:
        Path(out).write_text(
            json.dumps(dict(est=list(est), steps=state.steps, grad=[g.flatten().tolist() for g in grads]))
        )


def _control(world: int):
    """One process, the same samples: each rank's shard's gradient and the whole batch's."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = NoiseScaleAccumulator(LOCAL, LOCAL * world)
    for x, y in _batches(world):
        small = 0.0
        for r in range(world):
            opt.zero_grad()
            sl = slice(r * LOCAL, (r + 1) * LOCAL)
            nn.functional.cross_entropy(model(x[sl]), y[sl]).backward()
            small += sum(float(p.grad.square().sum()) for p in model.parameters()) / world
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        large = sum(float(p.grad.square().sum()) for p in model.parameters())
        acc.update(small, large)
        opt.step()
    return acc.value, [p.grad.flatten().tolist() for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
@pytest.mark.parametrize("world", [2, 4])
def test_ddp_hook_matches_the_single_process_estimator(world):
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "out.json")
        spawn_ranks(_ddp_worker, world, d, out)  # (each rank's stderr kept; no gloo thread outlives it)
        res = json.loads(Path(out).read_text())
    expected, grads = _control(world)
    assert res["steps"] == STEPS
    for got, want in zip(res["est"], expected, strict=True):
        assert got == pytest.approx(want, rel=1e-9, nan_ok=True)  # a few steps: |G|^2 may come out negative
    # and the hook all-reduced as DDP does: the training matched the one-process run
    for g, w in zip(res["grad"], grads, strict=True):
        assert g == pytest.approx(w, rel=1e-9, abs=1e-12)
