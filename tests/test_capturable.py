"""``capturable=True``: the step's schedule and finite check live on the parameters' device, so
``step()`` reads nothing on the host between occasional reads (a CUDA graph can capture it). Run
here on CPU tensors, against the host-scheduled multi-tensor step: the same schedule
(``schedule.factors`` and ``schedule.advance``) on tensors instead of Python numbers."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import DEVICE

from neumann_optimizer import Neumann, _graph_step
from neumann_optimizer.optimizer import DivergedWarning

HP = dict(burn_in_steps=3, reset_steps=4, momentum_ramp_steps=3, cubic_weight=1e-2, repulsive_weight=1e-4)
READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")


def _params(dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, dtype=dtype).to(DEVICE)) for s in ((5, 3), (4,))]


def _grads(params, i, bad):
    for p in params:
        p.grad = torch.sin(3 * p.detach()) + 0.01 * i
    if i in bad:
        params[0].grad[1, 2] = bad[i]


def _run(device, monkeypatch, steps, bad=(), dtype=torch.float32, **kw):
    """``steps`` steps of the device-scheduled (``device``: ``capturable=True``) or host-scheduled
    multi-tensor path; the gradient of step ``i`` holds ``bad[i]`` where given. Returns the params,
    the optimizer and the step indices (from 1) at which ``step()`` read a tensor on the host."""
    bad = dict(bad)
    params = _params(dtype)
    opt = Neumann(params, **{"lr": 0.05, "foreach": True, "capturable": device, **HP, **kw})
    reads: list[int] = []
    now = [0]
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            if now[0]:
                reads.append(now[0])
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(1, steps + 1):
            _grads(params, i, bad)
            now[0] = i
            opt.step()
            now[0] = 0
    monkeypatch.undo()  # the Tensor methods back
    return params, opt, reads


COUNTERS = ("step", "skipped_steps", "consecutive_skipped_steps", "next_reset", "reset_interval", "last_momentum")


@pytest.mark.filterwarnings("ignore:Neumann. non-finite gradient")
@pytest.mark.parametrize(
    "bad",
    [
        {},
        {2: float("nan"), 3: float("inf")},  # in burn-in, and at its last step (its end then unknown)
        {4: float("nan"), 5: float("-inf"), 6: float("nan"), 13: float("nan")},  # the first resets
        {i: float("nan") for i in range(9, 30)},  # a run of skips over a reset
    ],
)
@pytest.mark.parametrize("kw", [{}, {"cubic_weight": 0.0, "repulsive_weight": 0.0}, {"weight_decay": 0.01}])
def test_device_schedule_follows_the_host_schedule(bad, kw, monkeypatch):
    """The same weights, state and counters as the host-scheduled step, skips included: a skipped
    step writes nothing and the schedule counts only applied steps."""
    pa, oa, _ = _run(False, monkeypatch, 40, bad, **kw)
    pb, ob, _ = _run(True, monkeypatch, 40, bad, **kw)
    assert ob._sched and not oa._sched  # each took its path
    ga, gb = oa.state_dict()["param_groups"][0], ob.state_dict()["param_groups"][0]
    assert {k: ga[k] for k in COUNTERS} == {k: gb[k] for k in COUNTERS}
    assert gb["skipped_steps"] == len(bad)
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for key in oa.state[a]:
            torch.testing.assert_close(oa.state[a][key], ob.state[b][key], rtol=1e-5, atol=1e-6)
    ra, rb = oa.step_record(), ob.step_record()
    assert (ra["phase"], ra["momentum"], ra["lean"]) == (rb["phase"], rb["momentum"], rb["lean"])


def test_bfloat16_parameters_follow_the_host_schedule(monkeypatch):
    pa, _, _ = _run(False, monkeypatch, 30, {7: float("nan")}, dtype=torch.bfloat16)
    pb, ob, _ = _run(True, monkeypatch, 30, {7: float("nan")}, dtype=torch.bfloat16)
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
        assert ob.state[b]["v"].dtype == torch.float32


def test_no_host_read_between_the_periodic_ones(monkeypatch):
    """Through burn-in, the momentum ramp, several resets and skipped steps, with a tensor lr changed
    by a scheduler every step, ``step()`` reads the device only every SYNC_EVERY steps of the group;
    the host-scheduled multi-tensor step reads its finite check every step."""
    steps = 2 * _graph_step.SYNC_EVERY + 30
    bad = {5: float("nan"), 150: float("inf")}
    _, _, host_reads = _run(False, monkeypatch, 20)
    assert sorted(set(host_reads)) == list(range(1, 21))
    _, opt, reads = _run(True, monkeypatch, steps, bad, lr=torch.tensor(0.05, device=DEVICE))
    assert sorted(set(reads)) == [_graph_step.SYNC_EVERY, 2 * _graph_step.SYNC_EVERY]
    group = opt.state_dict()["param_groups"][0]
    assert (group["step"], group["skipped_steps"]) == (steps - 2, 2)
    assert isinstance(group["lr"], torch.Tensor)


def test_skipped_steps_write_nothing_and_leave_the_gradients(monkeypatch):
    params = _params()
    opt = Neumann(params, lr=0.05, capturable=True, **HP)
    for i in range(1, 8):
        _grads(params, i, {})
        opt.step()
    before = [p.detach().clone() for p in params] + [t.clone() for p in params for t in opt.state[p].values()]
    _grads(params, 8, {8: float("nan")})
    grads = [p.grad.clone() for p in params]
    opt.step()
    after = [p.detach() for p in params] + [t for p in params for t in opt.state[p].values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    bits = torch.int32
    assert all(torch.equal(g.view(bits), p.grad.view(bits)) for g, p in zip(grads, params, strict=True))
    with pytest.warns(RuntimeWarning, match="1 skipped so far"):
        assert opt.state_dict()["param_groups"][0]["skipped_steps"] == 1


def test_a_diverged_run_is_told_at_the_periodic_read(monkeypatch):
    """Every step skipped from step 3 on: the counts are exact when read, one DivergedWarning comes
    at the first read after 100 skips in a row (the periodic one), and skip warnings at the reads
    that cross 1, 10, 100 skips."""
    params = _params()
    opt = Neumann(params, lr=0.05, capturable=True, **HP)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(1, 3 + 2 * _graph_step.SYNC_EVERY):
            _grads(params, i, {i: float("nan")} if i >= 3 else {})
            opt.step()
    diverged = [w for w in caught if w.category is DivergedWarning]
    skipped = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert len(diverged) == 1
    # the first read (after 100 steps of the group) finds 98 skips, the second 198
    assert [int(m.split("; ")[1].split()[0]) for m in skipped] == [98, 198]
    group = opt.state_dict()["param_groups"][0]
    assert (group["step"], group["skipped_steps"], group["consecutive_skipped_steps"]) == (2, 200, 200)


@pytest.mark.parametrize("capturable", [False, True])
def test_compiled_then_eager_steps_keep_one_schedule(monkeypatch, capturable):
    """Steps under torch.compile, then eager ones (host- or device-scheduled), then compiled again:
    the counters are those of a run that took every step eagerly."""
    pa, oa, _ = _run(False, monkeypatch, 24)
    params = _params()
    opt = Neumann(params, lr=0.05, capturable=True, **HP)
    compiled = torch.compile(opt.step, backend="eager")
    for i in range(1, 25):
        _grads(params, i, {})
        (compiled if i <= 6 or i > 18 else opt.step)()
    group, ref = opt.state_dict()["param_groups"][0], oa.state_dict()["param_groups"][0]
    assert {k: group[k] for k in COUNTERS} == {k: ref[k] for k in COUNTERS}
    for a, b in zip(pa, params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
