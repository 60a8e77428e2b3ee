"""torch.compile(optimizer.step), the schedules, and Algorithm 1's exact identities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neumann_optimizer import Neumann
from neumann_optimizer.idealized import neumann_direction, neumann_outer_step
from neumann_optimizer.schedule import momentum_at, reset_steps_until


@pytest.mark.slow
def test_compiled_step_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    kw = dict(lr=0.05, burn_in_steps=2, reset_steps=3, momentum_ramp_steps=2, cubic_weight=1e-3, repulsive_weight=1e-4)
    opts = [Neumann(m.parameters(), **kw) for m in models]
    compiled_step = torch.compile(opts[1].step)
    x = torch.randn(10, 32, 8)
    y = torch.randint(0, 4, (10, 32))
    for i in range(10):
        for model, opt, step in ((models[0], opts[0], opts[0].step), (models[1], opts[1], compiled_step)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opts[1].param_groups[0]["step"] == 10


@pytest.mark.slow
def test_compiled_step_has_no_graph_break_and_skips_nonfinite_steps(capfd):
    """The default nonfinite="skip" under torch.compile: a tensor-valued finite check (no
    .item(), so no graph break warning), and a non-finite step writes nothing back."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = Neumann(model.parameters(), lr=0.05, burn_in_steps=1, reset_steps=2, momentum_ramp_steps=1)
    step = torch.compile(opt.step)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    for _ in range(4):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        step()
    err = capfd.readouterr().err  # dynamo logs graph breaks to stderr through its own handler
    assert "Graph break" not in err, err[-2000:]
    before = [p.detach().clone() for p in model.parameters()]
    state = [(opt.state[p]["m"].clone(), opt.state[p]["v"].clone()) for p in model.parameters()]
    model[0].weight.grad[0, 0] = float("nan")
    step()
    for p, b, (m, v) in zip(model.parameters(), before, state, strict=True):
        assert torch.equal(p, b)
        assert torch.equal(opt.state[p]["m"], m) and torch.equal(opt.state[p]["v"], v)


def test_momentum_schedule_matches_table_1():
    tau = 100
    assert momentum_at(tau, tau, 0.5, 0.9) == pytest.approx(0.5)
    assert momentum_at(1, tau, 0.5, 0.9) == 0.5  # clipped from below
    assert momentum_at(9 * tau, tau, 0.5, 0.9) == pytest.approx(0.9)
    assert momentum_at(50 * tau, tau, 0.5, 0.9) == 0.9
    assert momentum_at(3 * tau, tau, 0.5, 0.9) == pytest.approx(0.75)


def test_reset_schedule_doubles():
    assert reset_steps_until(100, 10, 2.0) == [1, 11, 31, 71]
    assert reset_steps_until(6, 1, 0.5) == [1, 2, 3, 4, 5, 6]


def _quadratic(n, seed, lam_max=1.0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    lams = np.linspace(0.05, lam_max, n)
    a = torch.tensor(q @ np.diag(lams) @ q.T)
    b = torch.tensor(rng.normal(size=n))
    return a, b


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 8), k=st.integers(0, 12), seed=st.integers(0, 999), eta=st.floats(0.1, 1.5))
def test_algorithm1_is_a_truncated_neumann_series(n, k, seed, eta):
    a, b = _quadratic(n, seed)
    w = torch.tensor(np.random.default_rng(seed + 1).normal(size=n))
    g = a @ w - b
    m = neumann_direction(lambda x: a @ x - b, w, eta, k)
    series = sum(torch.linalg.matrix_power(torch.eye(n, dtype=a.dtype) - eta * a, i) @ g for i in range(k + 1))
    torch.testing.assert_close(m, -series, rtol=1e-10, atol=1e-10)


def test_algorithm1_converges_to_newton_step():
    a, b = _quadratic(6, 0, lam_max=2.0)
    w = torch.ones(6, dtype=torch.float64)
    newton = -torch.linalg.solve(a, a @ w - b)
    eta = 0.9 / 2.0
    errs = [(eta * neumann_direction(lambda x: a @ x - b, w, eta, k) - newton).norm().item() for k in (5, 50, 2000)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-8
    # one outer step with eta_out = eta_in and many inner steps lands on the minimizer
    w1 = neumann_outer_step(lambda x: a @ x - b, w, eta, eta, 2000)
    torch.testing.assert_close(w1, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-8)
