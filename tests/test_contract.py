"""torch.optim's contract, group by group: schedules that advance only with a group's own gradients,
every option honoured per group, an explicit ``foreach`` choice honoured, and the lean step of a
group whose regularizers are both 0."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import ElementwiseProblem

from neumann_optimizer import Neumann, _graph_step, _native
from neumann_optimizer import functional as F

HP = dict(lr=0.1, burn_in_steps=3, reset_steps=4, momentum_ramp_steps=2, cubic_weight=0.05, repulsive_weight=1e-3)
LEAN = dict(HP, cubic_weight=0.0, repulsive_weight=0.0)
# "device": the device-scheduled step (schedule and finite check on the device), run on CPU
IMPLS = {"default": {}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}, "device": {"capturable": True}}


def _equal_state(opt_a, pa, opt_b, pb):
    for a, b in zip(pa, pb, strict=True):
        assert torch.equal(a, b)
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert set(sa) == set(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


# ---------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("impl", list(IMPLS))
def test_gradual_unfreezing_gives_the_late_group_its_own_burn_in(impl):
    """Group 1 gets no gradients for 8 steps (frozen), then trains. Its counter, burn-in, ramp and
    resets start from its first gradient: it matches an optimizer that trains group 1 alone from
    then on; group 0 matches an optimizer that trains group 0 alone."""
    frozen = 8
    both = ElementwiseProblem([[(5, 3), (3,)], [(4, 2)]], 0)
    alone0 = ElementwiseProblem([[(5, 3), (3,)], [(4, 2)]], 0)
    alone1 = ElementwiseProblem([[(5, 3), (3,)], [(4, 2)]], 0)
    opt = Neumann([{"params": both.params[0]}, {"params": both.params[1]}], **HP, **IMPLS[impl])
    opt0 = Neumann(alone0.params[0], **HP, **IMPLS[impl])
    opt1 = Neumann(alone1.params[1], **HP, **IMPLS[impl])
    for i in range(20):
        for problem in (both, alone0, alone1):
            problem.set_grads()
        if i < frozen:
            for p in both.params[1]:
                p.grad = None
        opt.step()
        opt0.step()
        if i >= frozen:
            opt1.step()
    assert opt.param_groups[0]["step"] == 20 and opt.param_groups[1]["step"] == 20 - frozen
    _equal_state(opt, both.params[0], opt0, alone0.params[0])
    _equal_state(opt, both.params[1], opt1, alone1.params[1])
    assert opt.param_groups[1]["last_momentum"] == opt1.param_groups[0]["last_momentum"]
    assert opt.param_groups[1]["next_reset"] == opt1.param_groups[0]["next_reset"]


def test_a_group_without_gradients_is_left_as_it_is():
    problem = ElementwiseProblem([[(3,)], [(2,)]], 1)
    opt = Neumann([{"params": problem.params[0]}, {"params": problem.params[1]}], **HP)
    before = opt.state_dict()["param_groups"][1]
    for _ in range(5):
        problem.set_grads()
        for p in problem.params[1]:
            p.grad = None
        opt.step()
    after = opt.state_dict()["param_groups"][1]
    assert after == before
    assert opt.step_record(1) is None and all(len(opt.state[p]) == 0 for p in problem.params[1])


# ---------------------------------------------------------------------------------- per-group options
PER_GROUP = {
    "lr": 0.03,
    "steps_per_epoch": 2,
    "burn_in_steps": 1,
    "reset_steps": 2,
    "reset_growth": 3.0,
    "momentum": (0.3, 0.6),
    "momentum_ramp_steps": 5.0,
    "cubic_weight": 0.2,
    "repulsive_weight": 1e-2,
    "ema_decay": 0.5,
    "weight_decay": 0.01,
    "regularizer_schedule": "lr",
    "nonfinite": "ignore",
    "evaluation": "in_place",
    "foreach": True,
    "fused": False,
}


@pytest.mark.parametrize("option", list(PER_GROUP))
def test_every_option_is_honoured_per_group(option):
    """An option set on group 1 only does to group 1 what it does in an optimizer of its own, and
    nothing to group 0."""
    value = PER_GROUP[option]
    own = {option: value}
    base = dict(HP)
    if option == "steps_per_epoch":  # counts in epochs: the optimizer's steps_per_epoch, the group's own
        base = {k: v for k, v in HP.items() if k not in ("burn_in_steps", "reset_steps", "momentum_ramp_steps")}
        base["steps_per_epoch"] = 1
    both = ElementwiseProblem([[(5, 3)], [(4, 2)]], 2)
    solo = ElementwiseProblem([[(5, 3)], [(4, 2)]], 2)
    opt = Neumann([{"params": both.params[0]}, {"params": both.params[1], **own}], **base)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    solo_kw = {**base, **own}
    opt0 = Neumann(solo.params[0], **base)
    opt1 = Neumann(solo.params[1], **solo_kw)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (opt0, opt1)]
    for _ in range(12):
        both.set_grads()
        solo.set_grads()
        for o in (opt, opt0, opt1):
            o.step()
        for s in (sched, *scheds):
            s.step()
    _equal_state(opt, both.params[0], opt0, solo.params[0])
    _equal_state(opt, both.params[1], opt1, solo.params[1])
    opt.eval()
    opt1.eval()
    for a, b in zip(both.params[1], solo.params[1], strict=True):
        assert torch.equal(a, b)  # evaluation weights (per group: "evaluation", the momentum used)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_nonfinite_is_read_per_group(impl):
    """raise on group 1 raises (naming its parameter) before anything is written; skip on one
    group skips that group only; ignore on a group does not look."""
    problem = ElementwiseProblem([[(3,)], [(2, 2)]], 3)
    groups = [{"params": problem.params[0]}, {"params": problem.params[1], "nonfinite": "raise"}]
    opt = Neumann(groups, **HP, **IMPLS[impl])
    problem.set_grads()
    opt.step()
    before = [p.detach().clone() for ps in problem.params for p in ps]
    problem.set_grads()
    problem.params[1][0].grad[0, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="param group 1"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, [p for ps in problem.params for p in ps], strict=True))
    assert [g["step"] for g in opt.param_groups] == [1, 1]

    opt.param_groups[1]["nonfinite"] = "skip"
    with pytest.warns(RuntimeWarning, match="param group 1 skipped"):
        opt.step()
        groups = opt.state_dict()["param_groups"]  # (where the device step skipped, it is told here)
    assert [g["step"] for g in groups] == [2, 1]  # group 0 stepped, group 1 skipped
    assert [g["skipped_steps"] for g in groups] == [0, 1]
    assert torch.equal(problem.params[1][0], before[1]) and not torch.equal(problem.params[0][0], before[0])

    opt.param_groups[1]["nonfinite"] = "ignore"
    opt.step()
    assert torch.isnan(problem.params[1][0]).any() and torch.isfinite(problem.params[0][0]).all()


# ---------------------------------------------------------------------------------- path choice
class _Called(Exception):
    pass


@pytest.mark.parametrize(("kwargs", "foreach"), [({}, True), ({"foreach": True}, True), ({"foreach": False}, False)])
def test_no_compilation_unless_asked_for_and_explicit_foreach_is_honoured(kwargs, foreach, monkeypatch):
    """Where the CPU kernel does not apply, ``fused=None`` never compiles on the user's behalf (as
    torch.optim never does): the multi-tensor step, or the for-loop where ``foreach=False`` says so."""
    seen = []

    def compiled(*args, **kw):
        raise _Called

    real = F.neumann_update
    monkeypatch.setattr(_native, "available", lambda: False)
    monkeypatch.setattr(F, "_native_neumann", compiled)
    monkeypatch.setattr(_graph_step, "_compiled", compiled)
    monkeypatch.setattr(F, "neumann_update", lambda *a, **kw: seen.append(kw["foreach"]) or real(*a, **kw))
    p = torch.nn.Parameter(torch.zeros(2**20))
    opt = Neumann([p], **HP, **kwargs)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.param_groups[0]["step"] == 1 and seen == [foreach]


# ---------------------------------------------------------------------------------- the lean step
def _step_together(pairs, steps: int) -> None:
    """``steps`` steps of each (problem, optimizer) pair, each on its own problem's gradients."""
    for _ in range(steps):
        for problem, opt in pairs:
            problem.set_grads()
            opt.step()


def _lean_run(steps, state_dict=None, **kw):
    problem = ElementwiseProblem([[(6, 4), (4,)]], 4)
    opt = Neumann(problem.params[0], **{**LEAN, **kw})
    if state_dict is not None:
        opt.load_state_dict(state_dict)
    return problem, opt


@pytest.mark.parametrize("impl", list(IMPLS))
def test_lean_step_keeps_only_the_iterate(impl):
    """Both regularizers 0: the state is m alone (4 bytes per float32 parameter, as
    SGD(momentum, nesterov=True)'s momentum buffer), and step_record says no norm was computed."""
    model = torch.nn.Linear(6, 3)
    opt = Neumann(model.parameters(), **LEAN, **IMPLS[impl])
    sgd = torch.optim.SGD(torch.nn.Linear(6, 3).parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for o, m in ((opt, model), (sgd, None)):
        params = model.parameters() if m is not None else sgd.param_groups[0]["params"]
        for p in params:
            p.grad = torch.ones_like(p)
        o.step()
    for _ in range(6):
        opt.step()
    ours = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    theirs = sum(t.numel() * t.element_size() for s in sgd.state.values() for t in s.values() if t.dim())
    assert ours == theirs == 4 * sum(p.numel() for p in model.parameters())
    assert all(set(s) == {"m"} for s in opt.state.values())
    rec = opt.step_record()
    assert rec["lean"] is True and rec["phase"] == "neumann" and rec["distance"] is None
    assert rec["cubic_force"] is None and rec["cubic_weight"] == 0.0
    opt.param_groups[0]["cubic_weight"] = 1e-7
    opt.step()  # step 8 is a reset (t = 5), which uses no norm
    opt.step()
    assert opt.step_record()["lean"] is False and opt.step_record()["distance"] is not None


@pytest.mark.parametrize("impl", list(IMPLS))
def test_turning_a_regularizer_on_starts_v_from_the_current_weights(impl):
    """A lean group whose cubic weight is edited on: at its next step v starts from the weights as
    they are, as an optimizer that had v = w at that moment would."""
    problem, opt = _lean_run(0, **IMPLS[impl])
    for _ in range(7):
        problem.set_grads()
        opt.step()
    sd = copy.deepcopy(opt.state_dict())  # (state_dict() holds the live buffers)
    twin_problem = ElementwiseProblem([[(6, 4), (4,)]], 4)
    with torch.no_grad():
        for a, b in zip(twin_problem.params[0], problem.params[0], strict=True):
            a.copy_(b)
    twin = Neumann(twin_problem.params[0], **{**HP, **IMPLS[impl]})
    for key, p in zip(sd["state"], problem.params[0], strict=True):
        sd["state"][key]["v"] = p.detach().clone()  # v = w now
    twin.load_state_dict(sd)
    for g in (opt.param_groups[0], twin.param_groups[0]):
        g["cubic_weight"], g["repulsive_weight"] = HP["cubic_weight"], HP["repulsive_weight"]
    _step_together([(problem, opt), (twin_problem, twin)], 6)
    _equal_state(opt, problem.params[0], twin, twin_problem.params[0])
    assert opt.step_record()["distance"] > 0


def test_lean_state_dicts_round_trip_both_ways():
    """Lean state -> lean optimizer resumes bit-identically; a state dict with v (0.1/0.2, or a
    regularized group) loads into a lean optimizer, which drops v at its next step and steps as
    the lean step does; a lean state loads, and a regularizer switched on after loading starts v."""
    full_problem, full = _lean_run(0)
    for _ in range(12):
        full_problem.set_grads()
        full.step()
    problem, opt = _lean_run(0)
    for _ in range(7):
        problem.set_grads()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert all(set(s) == {"m"} for s in sd["state"].values())
    resumed = Neumann(problem.params[0], **LEAN)
    resumed.load_state_dict(sd)
    old = copy.deepcopy(sd)  # (a loaded state dict's tensors become the optimizer's buffers)
    for s in old["state"].values():
        s["v"] = torch.zeros_like(s["m"])
    with_v_problem = ElementwiseProblem([[(6, 4), (4,)]], 4)
    with torch.no_grad():
        for a, b in zip(with_v_problem.params[0], problem.params[0], strict=True):
            a.copy_(b)
    with_v = Neumann(with_v_problem.params[0], **LEAN)
    with_v.load_state_dict(old)  # as a 0.2 checkpoint of a group with both weights 0 holds v
    _step_together([(problem, resumed), (with_v_problem, with_v)], 5)
    _equal_state(full, full_problem.params[0], resumed, problem.params[0])
    _equal_state(full, full_problem.params[0], with_v, with_v_problem.params[0])  # v dropped
    regularized = Neumann(problem.params[0], **HP)
    regularized.load_state_dict(sd)  # the state dict carries its hyperparameters (torch.optim's rule) ...
    assert regularized.param_groups[0]["cubic_weight"] == 0.0
    regularized.param_groups[0]["cubic_weight"] = HP["cubic_weight"]  # ... so the edit comes after loading
    problem.set_grads()
    regularized.step()
    assert all(set(regularized.state[p]) == {"m", "v"} for p in problem.params[0])
