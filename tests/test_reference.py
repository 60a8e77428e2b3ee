"""The optimizer against the independent float64 reference, and the reduction to Nesterov SGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEVICE, ElementwiseProblem, flat
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import RefGroup

from neumann_optimizer import Neumann

shape_st = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)
group_hp = st.fixed_dictionaries(
    {
        "lr": st.floats(0.01, 0.2),
        "burn_in_steps": st.integers(0, 4),
        "reset_steps": st.integers(1, 5),
        "reset_growth": st.sampled_from([1.0, 1.5, 2.0, 3.0]),
        "momentum": st.tuples(st.floats(0.0, 0.6), st.floats(0.6, 0.95)),
        "momentum_ramp_steps": st.floats(0.5, 6.0),
        "cubic_weight": st.floats(0.0, 0.1),
        "repulsive_weight": st.sampled_from([0.0, 1e-6, 1e-4, 1e-3]),
        "ema_decay": st.floats(0.5, 0.999),
        "weight_decay": st.sampled_from([0.0, 0.01]),
    }
)


def make_ref(problem: ElementwiseProblem, gi: int, hp: dict) -> RefGroup:
    return RefGroup.from_hyperparameters(problem.flat_w0(gi), hp)


@settings(max_examples=40, deadline=None)
@given(
    groups=st.lists(st.tuples(st.lists(shape_st, min_size=1, max_size=3), group_hp), min_size=1, max_size=3),
    path=st.sampled_from(["for-loop", "foreach", "device"]),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_reference_every_step(groups, path, seed):
    """Weights, iterate, average and evaluation weights equal the SPEC reference, step by step,
    through burn-in and several resets, with per-group hyperparameters and per-group norms, on the
    for-loop and multi-tensor paths and the device-scheduled step (``capturable=True``)."""
    shapes = [g[0] for g in groups]
    problem = ElementwiseProblem(shapes, seed)
    param_groups = [dict(params=problem.params[i], **hp) for i, (_, hp) in enumerate(groups)]
    _check_against_reference(problem, groups, param_groups, path != "for-loop", capturable=path == "device")


def _check_against_reference(problem, groups, param_groups, foreach, capturable=False):
    opt = Neumann(
        param_groups,
        lr=0.1,
        foreach=foreach,
        capturable=capturable,
        burn_in_steps=0,
        reset_steps=1,
        momentum_ramp_steps=1,
    )
    refs = [make_ref(problem, i, hp) for i, (_, hp) in enumerate(groups)]
    for _ in range(25):
        problem.set_grads()
        grads = [problem.np_grad(i, r.w) for i, r in enumerate(refs)]
        opt.step()
        for i, r in enumerate(refs):
            r.step(grads[i])
            ps = problem.params[i]
            np.testing.assert_allclose(flat(ps), r.w, rtol=1e-9, atol=1e-11)
            m = flat([opt.state[p]["m"] for p in ps])
            np.testing.assert_allclose(m, r.m, rtol=1e-9, atol=1e-11)
            if groups[i][1]["cubic_weight"] == groups[i][1]["repulsive_weight"] == 0:
                assert all("v" not in opt.state[p] for p in ps)  # the lean step keeps no v
            else:
                v = flat([opt.state[p]["v"] for p in ps])
                np.testing.assert_allclose(v, r.v, rtol=1e-9, atol=1e-11)
    ev = opt.evaluation_weights()
    for i, r in enumerate(refs):
        np.testing.assert_allclose(flat([ev[p] for p in problem.params[i]]), r.eval_weights(), rtol=1e-9, atol=1e-11)


def test_regularizer_is_active_in_reference_test():
    """Guard: with the test's weights the regularizer changes the trajectory (else the
    reference test above could not catch a wrong regularizer)."""
    hp = dict(
        lr=0.1,
        burn_in_steps=2,
        reset_steps=20,
        reset_growth=2.0,
        momentum=(0.5, 0.9),
        momentum_ramp_steps=2.0,
        cubic_weight=0.05,
        repulsive_weight=1e-3,
        ema_decay=0.9,
        weight_decay=0.0,
    )
    p1 = ElementwiseProblem([[(3, 4)]], 0)
    p2 = ElementwiseProblem([[(3, 4)]], 0)
    o1 = Neumann(p1.params[0], **hp)
    o2 = Neumann(p2.params[0], **{**hp, "cubic_weight": 0.0, "repulsive_weight": 0.0})
    for _ in range(10):
        p1.set_grads()
        p2.set_grads()
        o1.step()
        o2.step()
    assert not np.allclose(flat(p1.params[0]), flat(p2.params[0]), rtol=1e-6)


def test_lr_read_every_step_follows_scheduler():
    problem = ElementwiseProblem([[(5,), (2, 3)]], 3)
    hp = dict(
        lr=0.1,
        burn_in_steps=3,
        reset_steps=4,
        reset_growth=2.0,
        momentum=(0.5, 0.9),
        momentum_ramp_steps=3.0,
        cubic_weight=0.01,
        repulsive_weight=1e-4,
        ema_decay=0.9,
        weight_decay=0.0,
    )
    opt = Neumann(problem.params[0], **hp)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + 0.3 * k))
    ref = make_ref(problem, 0, hp)
    for k in range(20):
        problem.set_grads()
        g = problem.np_grad(0, ref.w)
        opt.step()
        ref.step(g, lr=0.1 / (1 + 0.3 * k))
        sched.step()
    np.testing.assert_allclose(flat(problem.params[0]), ref.w, rtol=1e-10)


def test_reduces_to_sgd_nesterov():
    """alpha = beta = 0, no burn-in, constant momentum, no reset after the first: Nesterov SGD
    (torch's form, with m = -lr * buf) on the displaced weights."""
    torch.manual_seed(0)
    model_a = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double().to(DEVICE)
    model_b = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double().to(DEVICE)
    model_b.load_state_dict(model_a.state_dict())
    lr, mu = 0.05, 0.9
    opt_a = Neumann(
        model_a.parameters(),
        lr=lr,
        burn_in_steps=0,
        reset_steps=10**9,
        momentum=(mu, mu),
        momentum_ramp_steps=1,
        cubic_weight=0.0,
        repulsive_weight=0.0,
    )
    opt_b = torch.optim.SGD(model_b.parameters(), lr=lr, momentum=mu, nesterov=True)
    x = torch.randn(64, 6, dtype=torch.float64).to(DEVICE)
    y = torch.randint(0, 3, (64,)).to(DEVICE)
    for step in range(30):
        xb, yb = x[(step % 4) * 16 : (step % 4 + 1) * 16], y[(step % 4) * 16 : (step % 4 + 1) * 16]
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
            torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(
                opt_a.state[pa]["m"], -lr * opt_b.state[pb]["momentum_buffer"], rtol=1e-12, atol=1e-13
            )


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_foreach_and_for_loop_paths_identical(seed, dtype):
    shapes = [[(7, 3), (3,), (1,)], [(4, 4)]]
    runs = []
    for foreach in (False, True):
        problem = ElementwiseProblem(shapes, seed, dtype=dtype)
        opt = Neumann(
            [{"params": problem.params[0]}, {"params": problem.params[1], "lr": 0.03}],
            lr=0.1,
            burn_in_steps=2,
            reset_steps=3,
            momentum_ramp_steps=2,
            cubic_weight=0.05,
            repulsive_weight=1e-3,
            weight_decay=0.01,
            foreach=foreach,
        )
        for _ in range(15):
            problem.set_grads()
            opt.step()
        runs.append((problem, opt))
    (pa, oa), (pb, ob) = runs
    for ga, gb in zip(pa.params, pb.params, strict=True):
        for a, b in zip(ga, gb, strict=True):
            # same elementwise ops in the same order; the group norm may differ by reduction order
            torch.testing.assert_close(a, b, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=1e-7)
            torch.testing.assert_close(oa.state[a]["m"], ob.state[b]["m"], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(oa.state[a]["v"], ob.state[b]["v"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("kwargs", "beta_per_n"), [({"repulsive_weight": 1e-5}, 1e-5), ({}, 0.0)])
def test_paper_defaults_are_one_argument_away(kwargs, beta_per_n):
    """``repulsive_weight=1e-5`` with every other default is the paper's Table 1, step for step
    against the float64 reference; without it (the library's default) beta is 0."""
    problem = ElementwiseProblem([[(4, 3), (5,)]], 11)
    spe = 3
    opt = Neumann(problem.params[0], lr=0.05, steps_per_epoch=spe, **kwargs)
    ref = RefGroup(
        w=problem.flat_w0(0),
        lr=0.05,
        burn_in=5 * spe,
        reset0=10 * spe,
        growth=2.0,
        mu_min=0.5,
        mu_max=0.9,
        tau=float(spe),
        alpha=1e-7,
        beta_per_n=beta_per_n,
        gamma=0.99,
        wd=0.0,
    )
    for _ in range(120):  # burn-in, resets at t = 1, 31, 91, regularized steps between
        problem.set_grads()
        opt.step()
        ref.step(problem.np_grad(0, ref.w))
        np.testing.assert_allclose(flat(problem.params[0]), ref.w, rtol=0, atol=1e-12)
    assert opt.param_groups[0]["next_reset"] == ref.next_reset
