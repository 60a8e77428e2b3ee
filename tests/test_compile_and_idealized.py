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
    # the compiled steps counted on the device; state_dict() brings the host counters up to date
    assert opts[1].state_dict()["param_groups"][0] == opts[0].state_dict()["param_groups"][0]


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
    with pytest.warns(RuntimeWarning, match="1 skipped so far"):  # counted on the device, warned when read
        record = opt.step_record()
    group = opt.param_groups[0]
    assert group["step"] == 4 and group["skipped_steps"] == 1 and record["step"] == 4  # as an eager skip


class _CountingBackend:
    """A torch.compile backend that counts the graphs it is handed (and runs them eagerly)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _compiled_run(steps: int, groups, lr, backend, **kw):
    torch._dynamo.reset()
    opt = Neumann(groups, lr=lr, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + 0.01 * k))  # a new lr every step
    step = torch.compile(opt.step, backend=backend)
    for _ in range(steps):
        opt.zero_grad()
        for g in groups:
            for p in g["params"]:
                p.grad = torch.sin(p.detach()) + 0.1  # a deterministic gradient
        step()
        sched.step()
    return opt


@pytest.mark.slow
@pytest.mark.parametrize("impl", [{"foreach": True}, {"foreach": False}, {}])
def test_compiled_step_compiles_two_graphs_over_the_whole_schedule(impl):
    """Burn-in, the momentum ramp, three resets and the Neumann phase, with a tensor lr that an
    LR scheduler changes every step: one graph for the first step (it creates the state) and one for
    all the others, and the trajectory of the eager optimizer."""
    torch.manual_seed(0)
    kw = dict(burn_in_steps=3, momentum_ramp_steps=10, reset_steps=6, cubic_weight=1e-3, repulsive_weight=1e-4)
    shapes = [[(5, 3), (3,)], [(4, 3), (3,)]]  # two groups, equal tensor counts, different shapes
    made = [[torch.nn.Parameter(torch.randn(s)) for s in shp] for shp in shapes]
    twins = [[torch.nn.Parameter(p.detach().clone()) for p in ps] for ps in made]
    counter = _CountingBackend()
    opt = _compiled_run(40, [{"params": ps} for ps in made], torch.tensor(0.05), counter, **kw, **impl)
    eager = Neumann([{"params": ps} for ps in twins], lr=torch.tensor(0.05), **kw, **impl)
    sched = torch.optim.lr_scheduler.LambdaLR(eager, lambda k: 1.0 / (1 + 0.01 * k))
    for _ in range(40):
        for ps in twins:
            for p in ps:
                p.grad = torch.sin(p.detach()) + 0.1
        eager.step()
        sched.step()
    assert counter.graphs == 2, counter.graphs
    assert opt.state_dict()["param_groups"][0]["next_reset"] == eager.param_groups[0]["next_reset"] > 20
    for ps, qs in zip(made, twins, strict=True):
        for p, q in zip(ps, qs, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_no_recompile_limit_warning_over_many_steps():
    """10,000 steps (a run through every phase, lr changing every step) under dynamo's
    error_on_recompile once the steady graph exists: no recompilation at all."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4))]
    kw = dict(burn_in_steps=3, reset_steps=5, momentum_ramp_steps=50)
    opt = _compiled_run(2, [{"params": params}], torch.tensor(0.05), "eager", **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + 0.001 * k))
    step = torch.compile(opt.step, backend="eager")
    for p in params:
        p.grad = torch.ones_like(p)
    step()  # the steady graph, compiled once more for this wrapper
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(10_000):
            step()
            sched.step()
    assert opt.state_dict()["param_groups"][0]["step"] == 10_003


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


@pytest.mark.slow
def test_compiled_step_reads_nothing_on_the_host_in_steady_state(monkeypatch):
    """With the default nonfinite="skip" and a tensor lr, steady-state compiled steps make no host
    read (no .item(), bool(), float() or .tolist() of a tensor); the eager multi-tensor step on CPU,
    for comparison, makes one per step (its finite check; on accelerators it makes none, as
    tests/test_sync_free.py checks)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4))]
    kw = dict(lr=torch.tensor(0.05), burn_in_steps=2, reset_steps=3, momentum_ramp_steps=4, foreach=True)
    opt = Neumann(params, **kw)
    step = torch.compile(opt.step, backend="eager")
    for p in params:
        p.grad = torch.sin(p.detach())
    for _ in range(3):  # the first-step graph, then the steady one
        step()
    reads = []
    for name in ("item", "__bool__", "__float__", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for _ in range(20):
        step()
    compiled_reads = len(reads)
    eager = Neumann([torch.nn.Parameter(p.detach().clone()) for p in params], **kw)
    for p in eager.param_groups[0]["params"]:
        p.grad = torch.sin(p.detach())
    eager.step()
    reads.clear()
    for _ in range(5):
        eager.step()
    assert compiled_reads == 0, reads
    assert len(reads) >= 5  # the eager multi-tensor path on CPU reads its finite check on the host
