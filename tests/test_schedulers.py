"""Momentum-cycling schedulers (OneCycleLR, CyclicLR) and a constant float momentum, held to the
float64 reference; the in-place evaluation switch (issue 10, items 1 and 4)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import flat
from reference import RefGroup

from neumann_optimizer import Neumann, ScheduleWarning

KW = dict(burn_in_steps=3, reset_steps=5, reset_growth=2.0, momentum_ramp_steps=2.0, repulsive_weight=1e-5)


def _reference(problem, lr: float) -> RefGroup:
    return RefGroup(
        problem.flat_w0(0),
        lr=lr,
        burn_in=3,
        reset0=5,
        growth=2.0,
        mu_min=0.5,
        mu_max=0.9,
        tau=2.0,
        alpha=1e-7,
        beta_per_n=1e-5,
        gamma=0.99,
        wd=0.0,
    )


def _schedulers():
    return {
        "one-cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=40),
        "cyclic": lambda opt: torch.optim.lr_scheduler.CyclicLR(
            opt, base_lr=0.01, max_lr=0.1, step_size_up=4, base_momentum=0.6, max_momentum=0.95
        ),
    }


@pytest.mark.parametrize("path", [dict(foreach=False), dict(foreach=True), dict(fused=True)])
@pytest.mark.parametrize("name", ["one-cycle", "cyclic"])
def test_momentum_cycling_scheduler_sets_each_steps_mu(problem_factory, name, path):
    problem = problem_factory([[(3, 4), (5,)]], seed=7)
    opt = Neumann(problem.params[0], lr=0.05, **KW, **path)
    sched = _schedulers()[name](opt)  # default cycle_momentum=True: writes group["momentum"]
    ref = _reference(problem, 0.05)
    group = opt.param_groups[0]
    used = []
    for s in range(1, 31):
        problem.set_grads()
        g = flat(p.grad for p in problem.params[0])
        lr, mu = float(group["lr"]), group["momentum"]
        assert isinstance(mu, float)
        opt.step()
        ref.step(g, lr=lr, mu=mu)
        if s > 3:  # Neumann phase: the step used the scheduler's momentum
            assert group["last_momentum"] == mu
            used.append(mu)
        np.testing.assert_allclose(flat(problem.params[0]), ref.w, rtol=1e-12, atol=1e-12)
        sched.step()
    assert len(set(used)) >= 5 and max(used) - min(used) > 0.08  # the momentum really cycled
    with torch.no_grad():
        opt.eval()
        np.testing.assert_allclose(flat(problem.params[0]), ref.eval_weights(), rtol=1e-12, atol=1e-12)


def test_float_momentum_is_the_constant_pair(problem_factory):
    a, b = problem_factory([[(6,)]], seed=1), problem_factory([[(6,)]], seed=1)
    oa = Neumann(a.params[0], lr=0.05, momentum=0.8, **KW)
    ob = Neumann(b.params[0], lr=0.05, momentum=(0.8, 0.8), **KW)
    for _ in range(20):
        a.set_grads()
        b.set_grads()
        oa.step()
        ob.step()
    assert torch.equal(a.params[0][0], b.params[0][0])
    assert oa.param_groups[0]["last_momentum"] == 0.8


@pytest.mark.parametrize("momentum", [0.85, (0.5, 0.9)])
def test_state_dict_round_trips_either_momentum_form(problem_factory, momentum):
    full, cut = problem_factory([[(5,)]], seed=3), problem_factory([[(5,)]], seed=3)
    of = Neumann(full.params[0], lr=0.05, momentum=momentum, **KW)
    oc = Neumann(cut.params[0], lr=0.05, momentum=momentum, **KW)
    for _ in range(8):
        for pr, o in ((full, of), (cut, oc)):
            pr.set_grads()
            o.step()
    buf = io.BytesIO()
    torch.save(oc.state_dict(), buf)
    buf.seek(0)
    resumed = Neumann(cut.params[0], lr=0.05, **KW)  # constructed with the default pair
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    pair = momentum if isinstance(momentum, tuple) else (momentum, momentum)
    assert resumed.param_groups[0]["momentum_bounds"] == pair
    assert resumed.param_groups[0]["momentum"] == oc.param_groups[0]["last_momentum"] > 0
    for _ in range(8):
        for pr, o in ((full, of), (cut, resumed)):
            pr.set_grads()
            o.step()
    assert torch.equal(full.params[0][0], cut.params[0][0])


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), "0.9", (0.9, 0.5), (0.1, 0.2, 0.3), True])
def test_bad_momentum_is_named(bad):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="momentum"):
        Neumann([p], lr=0.1, **{**KW, "momentum": bad})


def test_bad_momentum_written_by_a_scheduler_is_named_at_the_step():
    p = torch.nn.Parameter(torch.ones(3))
    opt = Neumann([p], lr=0.1, **{**KW, "burn_in_steps": 0})
    opt.param_groups[0]["momentum"] = 1.7
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="momentum"):
        opt.step()
    assert torch.equal(p, torch.ones(3))  # nothing was written


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_place_evaluation_keeps_no_copy_and_restores_within_rounding(problem_factory, dtype):
    exact, inplace = problem_factory([[(40, 30), (30,)]], seed=5, dtype=dtype), None
    inplace = problem_factory([[(40, 30), (30,)]], seed=5, dtype=dtype)
    oe = Neumann(exact.params[0], lr=0.05, **KW)
    oi = Neumann(inplace.params[0], lr=0.05, evaluation="in_place", **KW)
    for _ in range(12):
        for pr, o in ((exact, oe), (inplace, oi)):
            pr.set_grads()
            o.step()
    before = [p.detach().clone() for p in inplace.params[0]]
    oe.eval()
    oi.eval()
    assert all("train_param" not in oi.state[p] for p in inplace.params[0])  # no per-parameter copy
    assert all("train_param" in oe.state[p] for p in exact.params[0])
    for a, b in zip(exact.params[0], inplace.params[0], strict=True):
        assert torch.equal(a, b)  # the same evaluation weights w - mu m
    oi.eval()  # idempotent
    oi.train()
    oi.train()
    eps = torch.finfo(dtype).eps
    for p, w in zip(inplace.params[0], before, strict=True):
        torch.testing.assert_close(p, w, rtol=4 * eps, atol=4 * eps * float(w.abs().max()))
    # and training goes on from there
    inplace.set_grads()
    oi.step()


def test_evaluation_mode_is_validated():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="evaluation"):
        Neumann([p], lr=0.1, evaluation="copy", **KW)


def test_state_dict_from_before_these_options_loads():
    p = torch.nn.Parameter(torch.ones(4))
    opt = Neumann([p], lr=0.1, **{**KW, "burn_in_steps": 0})
    p.grad = torch.ones(4)
    opt.step()
    sd = opt.state_dict()
    for g in sd["param_groups"]:  # as saved by version 0.1
        del g["evaluation"], g["eval_shift"]
    fresh = Neumann([p], lr=0.1, **KW)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["evaluation"] == "exact" and fresh.param_groups[0]["eval_shift"] == 0.0
    w = p.detach().clone()
    fresh.eval()
    fresh.train()
    assert torch.equal(p, w)


@pytest.mark.parametrize("name", ["one-cycle", "cyclic"])
def test_a_scheduler_that_takes_over_the_momentum_in_the_burn_in_is_told(problem_factory, name):
    problem = problem_factory([[(3, 4)]], seed=1)
    opt = Neumann(problem.params[0], lr=0.05, **KW)
    _schedulers()[name](opt)  # cycle_momentum=True (the default) writes group["momentum"] at once
    problem.set_grads()
    with pytest.warns(ScheduleWarning, match=r"during the burn-in .*cycle_momentum=False"):
        opt.step()


def test_cycle_momentum_false_and_a_write_after_the_ramp_are_not_warned(problem_factory, recwarn):
    problem = problem_factory([[(3, 4)]], seed=1)
    opt = Neumann(problem.params[0], lr=0.05, **KW)  # burn-in 3, ramp tau 2: mu reaches 0.9 at s = 3 + 18
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=40, cycle_momentum=False)
    for _ in range(22):
        problem.set_grads()
        opt.step()
        sched.step()
    opt.param_groups[0]["momentum"] = 0.8  # a write past the ramp: the user's own choice, no warning
    problem.set_grads()
    opt.step()
    assert not [w for w in recwarn if issubclass(w.category, ScheduleWarning)]
    assert opt.param_groups[0]["last_momentum"] == 0.8
