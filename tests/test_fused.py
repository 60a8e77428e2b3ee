"""The fused (torch.compile) path against the for-loop path: values, not timings."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import ElementwiseProblem

from neumann_optimizer import Neumann
from neumann_optimizer import functional as F

pytestmark = pytest.mark.slow
HP = dict(lr=0.1, burn_in_steps=2, reset_steps=3, momentum_ramp_steps=2, cubic_weight=0.05, repulsive_weight=1e-3)


def _run(fused: bool, dtype, steps=14, poke_at=None, eval_at=None, wd=0.0):
    problem = ElementwiseProblem([[(7, 3), (3,), (1,)], [(4, 4)]], 0, dtype=dtype)
    opt = Neumann(
        [{"params": problem.params[0]}, {"params": problem.params[1], "lr": 0.03}],
        fused=fused,
        foreach=None if fused else False,
        weight_decay=wd,
        **HP,
    )
    for i in range(1, steps + 1):
        problem.set_grads()
        opt.step()
        if i == eval_at:
            opt.eval()
            opt.train()
        if i == poke_at:  # an in-place change of the weights outside the optimizer
            with torch.no_grad():
                problem.params[0][0].mul_(1.01)
    return problem, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["plain", "eval_train", "poked", "weight_decay"])
def test_fused_matches_for_loop(dtype, case):
    kw = {"plain": {}, "eval_train": {"eval_at": 7}, "poked": {"poke_at": 8}, "weight_decay": {"wd": 0.01}}[case]
    (pa, oa), (pb, ob) = _run(False, dtype, **kw), _run(True, dtype, **kw)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for ga, gb in zip(pa.params, pb.params, strict=True):
        for a, b in zip(ga, gb, strict=True):
            torch.testing.assert_close(a, b, **tol)
            torch.testing.assert_close(oa.state[a]["m"], ob.state[b]["m"], **tol)
            torch.testing.assert_close(oa.state[a]["v"], ob.state[b]["v"], **tol)
    assert not ob._fused_failed


def test_fused_resume_is_identical(tmp_path):
    full_problem, full = _run(True, torch.float64, steps=12)
    problem = ElementwiseProblem([[(7, 3), (3,), (1,)], [(4, 4)]], 0)
    opt = Neumann([{"params": problem.params[0]}, {"params": problem.params[1], "lr": 0.03}], fused=True, **HP)
    for _ in range(7):
        problem.set_grads()
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    opt2 = Neumann([{"params": problem.params[0]}, {"params": problem.params[1], "lr": 0.03}], fused=True, **HP)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for _ in range(5):
        problem.set_grads()
        opt2.step()
    for ga, gb in zip(full_problem.params, problem.params, strict=True):
        for a, b in zip(ga, gb, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
            torch.testing.assert_close(full.state[a]["m"], opt2.state[b]["m"], rtol=1e-13, atol=1e-14)


def test_fused_falls_back_when_compilation_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(F, "fused_neumann_update", broken)
    with pytest.warns(RuntimeWarning, match="falling back"):
        pb, ob = _run(True, torch.float64, steps=6)
    assert ob._fused_failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pb.set_grads()
        ob.step()  # no second warning


def test_default_path_choice():
    from neumann_optimizer.optimizer import FUSED_DEFAULT_MIN_NUMEL, _default_fused

    assert _default_fused([torch.zeros(FUSED_DEFAULT_MIN_NUMEL // 2), torch.zeros(FUSED_DEFAULT_MIN_NUMEL // 2)])
    assert not _default_fused([torch.zeros(1000)])  # small models start at once, no compile
    opt = Neumann([torch.nn.Parameter(torch.zeros(10))], lr=0.1, **{k: v for k, v in HP.items() if k != "lr"})
    assert not opt._use_fused(opt.param_groups[0], opt.param_groups[0]["params"])
