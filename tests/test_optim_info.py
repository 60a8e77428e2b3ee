"""What PyTorch's generic optimizer suite checks of every optimizer, written by us and driven by
Neumann's ``OptimizerInfo`` (tests/optim_info.py): error inputs, per-group settings, schedulers,
state-dict round trips, every implementation in every float dtype against a float64 step,
complex and meta parameters, no-op steps and deepcopy."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from optim_info import SHORT, neumann_error_inputs, neumann_inputs, neumann_optim_info
from torch.testing._internal.common_optimizers import OptimizerErrorEnum

from neumann_optimizer import Neumann

CONFIGS = neumann_inputs("cpu")
IDS = [c.desc for c in CONFIGS]
IMPLS = {
    "for-loop": dict(foreach=False, fused=False),
    "multi-tensor": dict(foreach=True, fused=False),
    "fused": dict(fused=True),
}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(4, 5), (5,), (3,), (1,)]


def make_params(dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_() for s in SHAPES
    ]


def set_grads(params, k):
    """A deterministic non-quadratic gradient, computed in float64 and rounded to the dtype."""
    with torch.no_grad():
        for i, p in enumerate(params):
            w = p.detach().double()
            p.grad = (torch.sin(3 * w + k) + (0.5 + i) * (w - 0.3)).to(p.dtype)


def run(opt, params, steps, start=0, sched=None):
    for k in range(start, start + steps):
        set_grads(params, k)
        opt.step()
        for s in sched or []:
            s.step(1.0) if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) else s.step()


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize("err", neumann_error_inputs(), ids=lambda e: e.optimizer_error_input.desc)
def test_error_inputs_raise_naming_the_culprit(err):
    inp = err.optimizer_error_input
    if err.error_on is OptimizerErrorEnum.CONSTRUCTION_ERROR:
        with pytest.raises(err.error_type, match=err.error_regex):
            Neumann(inp.params, **inp.kwargs)
        return
    opt = Neumann(inp.params, **inp.kwargs)
    with pytest.raises(err.error_type, match=err.error_regex):
        opt.step()
    assert len(opt.state) == 0 and opt.param_groups[0]["step"] == 0  # nothing was created or counted


def test_info_is_truthful():
    info = neumann_optim_info
    assert info.optim_cls is Neumann and set(info.supported_impls) == {"foreach", "fused"}
    assert info.supports_complex and not info.supports_sparse and info.has_capturable_arg
    assert len(CONFIGS) == 11


# ----------------------------------------------------------------- per-group settings
def test_each_group_may_carry_lr_and_step_counts():
    """No top-level lr or step counts: each group brings its own (or its own steps_per_epoch),
    and the result equals one optimizer per group."""
    a, b = make_params(seed=1)[:2], make_params(seed=2)[2:]
    a2, b2 = [p.detach().clone().requires_grad_() for p in a], [p.detach().clone().requires_grad_() for p in b]
    opt = Neumann(
        [
            {"params": a, "lr": 0.1, "weight_decay": 0.01, **SHORT},
            {"params": b, "lr": 0.05, "steps_per_epoch": 2, "cubic_weight": 1e-2, "repulsive_weight": 1e-3},
        ]
    )
    g1 = opt.param_groups[1]
    assert (g1["burn_in_steps"], g1["reset_steps"], g1["momentum_ramp_steps"]) == (10, 20, 2)
    alone = [
        Neumann(a2, lr=0.1, weight_decay=0.01, **SHORT),
        Neumann(b2, lr=0.05, steps_per_epoch=2, cubic_weight=1e-2, repulsive_weight=1e-3),
    ]
    for k in range(25):
        set_grads(a + b, k)
        set_grads(a2 + b2, k)
        opt.step()
        for o in alone:
            o.step()
    for x, y in zip(a + b, a2 + b2, strict=True):
        assert torch.equal(x, y)


def test_group_without_lr_or_step_counts_is_named():
    p = make_params()
    with pytest.raises(ValueError, match="param group 1 has no lr"):
        Neumann([{"params": p[:2], "lr": 0.1}, {"params": p[2:]}], **SHORT)
    with pytest.raises(ValueError, match=r"burn_in_steps \(5 epochs\).* not given .*\(param group 1\)"):
        Neumann([{"params": p[:2], **SHORT}, {"params": p[2:]}], lr=0.1)
    # a top-level steps_per_epoch serves every group; a group's own overrides it
    opt = Neumann([{"params": p[:2]}, {"params": p[2:], "steps_per_epoch": 3}], lr=0.1, steps_per_epoch=7)
    assert [g["burn_in_steps"] for g in opt.param_groups] == [35, 15]
    # step counts given in steps win over a group's steps_per_epoch
    opt = Neumann(
        [{"params": p[:2]}, {"params": p[2:], "steps_per_epoch": 3}],
        lr=0.1,
        burn_in_steps=4,
        **{k: v for k, v in SHORT.items() if k != "burn_in_steps"},
    )
    assert [g["burn_in_steps"] for g in opt.param_groups] == [4, 4]


def test_add_param_group_later_and_bad_group_values():
    p = make_params()
    opt = Neumann(p[:2], lr=0.1, **SHORT)
    opt.add_param_group({"params": p[2:], "lr": 0.01, "ema_decay": 0.5})
    assert opt.param_groups[1]["burn_in_steps"] == SHORT["burn_in_steps"] and opt.param_groups[1]["lr"] == 0.01
    with pytest.raises(ValueError, match="ema_decay"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "ema_decay": 2.0})


# ----------------------------------------------------------------- schedulers
@pytest.mark.parametrize("schedulers", neumann_optim_info.scheduler_inputs, ids=str)
def test_schedulers_set_the_lr_of_each_step(schedulers):
    """Every scheduler of the info drives the lr: the same run with the lr set by hand before each
    step to what the schedulers set is bit-identical."""
    p, q = make_params(seed=3), make_params(seed=3)
    opt = Neumann(p, lr=0.1, **SHORT)
    scheds = [make(opt) for make in schedulers]
    manual = Neumann(q, lr=0.1, **SHORT)
    lrs = []
    for k in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        run(opt, p, 1, start=k, sched=scheds)
    for k, lr in enumerate(lrs):
        manual.param_groups[0]["lr"] = lr
        run(manual, q, 1, start=k)
    assert len(set(lrs)) > 1 or isinstance(scheds[0], torch.optim.lr_scheduler.ReduceLROnPlateau)
    for x, y in zip(p, q, strict=True):
        assert torch.equal(x, y)


# ----------------------------------------------------------------- state dicts
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("impl", ["for-loop", "fused"])
def test_state_dict_round_trip_resumes_bit_identically(cfg, impl):
    p = make_params(seed=4)
    opt = Neumann(p, **cfg.kwargs, **IMPLS[impl])
    run(opt, p, 4)
    buf = io.BytesIO()
    torch.save({"params": [x.detach() for x in p], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    q = [x.clone().requires_grad_() for x in saved["params"]]
    resumed = Neumann(q, **cfg.kwargs, **IMPLS[impl])
    resumed.load_state_dict(saved["opt"])
    run(opt, p, 7, start=4)
    run(resumed, q, 7, start=4)
    for x, y in zip(p, q, strict=True):
        assert torch.equal(x, y)
    assert opt.state_dict()["param_groups"][0]["step"] == resumed.state_dict()["param_groups"][0]["step"] == 11
    for x, y in zip(p, q, strict=True):
        assert torch.equal(opt.state[x]["m"], resumed.state[y]["m"])
        assert torch.equal(opt.state[x]["v"], resumed.state[y]["v"])


def test_deepcopy_and_no_op_steps():
    p = make_params(seed=5)
    opt = Neumann(p, lr=0.1, **SHORT)
    before = [x.detach().clone() for x in p]
    opt.step()  # no gradients: nothing changes, no state
    assert len(opt.state) == 0 and all(torch.equal(x, y) for x, y in zip(p, before, strict=True))
    set_grads(p[:1], 0)
    opt.step()  # only the parameter with a gradient moves and gets state
    assert set(opt.state) == {p[0]} and all(torch.equal(x, y) for x, y in zip(p[1:], before[1:], strict=True))
    clone = copy.deepcopy(opt)
    assert repr(clone) == repr(opt)
    assert torch.equal(next(iter(clone.state.values()))["m"], opt.state[p[0]]["m"])
    opt.zero_grad()
    assert all(x.grad is None for x in p)


# ----------------------------------------------------------------- every impl, every dtype
def _sync_twin(opt, twin, params, tparams):
    """Put the float64 twin exactly where the low-precision optimizer is."""
    with torch.no_grad():
        for p, t in zip(params, tparams, strict=True):
            t.copy_(p.double())
            if p in opt.state:
                twin.state[t]["m"] = opt.state[p]["m"].double()
                twin.state[t]["v"] = opt.state[p]["v"].double()
    for key in ("step", "next_reset", "reset_interval", "last_momentum", "lr", "reference_lr"):
        twin.param_groups[0][key] = opt.param_groups[0][key]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("cfg", [CONFIGS[i] for i in (0, 2, 4, 6)], ids=lambda c: c.desc)
def test_every_impl_follows_a_float64_step_in_every_dtype(cfg, impl, dtype):
    """Each step, from the same state, agrees with one float64 step rounded to the dtype, within
    torch's default tolerances for that dtype (torch.testing.assert_close)."""
    params = make_params(dtype, seed=6)
    tparams = [p.detach().double().requires_grad_() for p in params]
    opt = Neumann(params, **cfg.kwargs, **IMPLS[impl])
    twin = Neumann(tparams, **cfg.kwargs, foreach=False, fused=False)
    phases = set()
    for k in range(9):  # burn-in (2), resets at t = 1, 4, regularized steps
        _sync_twin(opt, twin, params, tparams)
        set_grads(params, k)
        for p, t in zip(params, tparams, strict=True):
            t.grad = p.grad.double()
        opt.step()
        twin.step()
        phases.add(opt.step_record()["phase"])
        for p, t in zip(params, tparams, strict=True):
            torch.testing.assert_close(p, t.to(dtype), msg=lambda m, k=k: f"step {k + 1}: {m}")
            torch.testing.assert_close(opt.state[p]["m"], twin.state[t]["m"].to(dtype))
    assert phases == {"burn_in", "reset", "neumann"}


def test_squared_distance_of_half_precision_is_summed_in_float32():
    """The regularizer's norm of bfloat16 tensors is within float32 rounding of float64's."""
    from neumann_optimizer import functional as F

    g = torch.Generator().manual_seed(0)
    w = [torch.randn(1000, generator=g).bfloat16() for _ in range(3)]
    v = [x + (1e-2 * torch.randn(1000, generator=g)).bfloat16() for x in w]
    exact = sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(w, v, strict=True))
    for foreach in (False, True):
        sq = F.squared_distance(w, v, foreach)
        assert sq.dtype == torch.float32
        assert math.isclose(float(sq), exact, rel_tol=1e-5)


# ----------------------------------------------------------------- complex and meta
@pytest.mark.parametrize("impl", list(IMPLS))
def test_complex_parameter_is_its_real_view(impl):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(6, dtype=torch.complex128, generator=g).requires_grad_()
    r = torch.view_as_real(z.detach()).clone().requires_grad_()
    kw = dict(lr=0.05, cubic_weight=1e-2, repulsive_weight=1e-3, **SHORT)
    oz, orr = Neumann([z], **kw, **IMPLS[impl]), Neumann([r], **kw, foreach=False, fused=False)
    for k in range(9):
        with torch.no_grad():
            z.grad = torch.sin(z.detach() + k)
            r.grad = torch.view_as_real(z.grad).clone()
        oz.step()
        orr.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_meta_parameters_are_refused_before_any_state(impl):
    p = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
    p.grad = torch.empty(4, 3, device="meta")
    opt = Neumann([p], lr=0.1, nonfinite="ignore", **SHORT, **IMPLS[impl])
    with pytest.raises(RuntimeError, match="meta device"):
        opt.step()
    assert len(opt.state) == 0 and opt.param_groups[0]["step"] == 0
    # once materialised, the optimizer works as if nothing had happened
    with torch.no_grad():
        q = torch.nn.Parameter(torch.ones(4, 3))
    opt.param_groups[0]["params"] = [q]
    q.grad = torch.ones(4, 3)
    opt.step()
    assert opt.param_groups[0]["step"] == 1 and torch.allclose(q, torch.full((4, 3), 0.9))


def test_gradient_of_another_dtype_is_refused():
    p = torch.nn.Parameter(torch.ones(3))
    if not hasattr(p, "grad_dtype"):  # torch < 2.9 has no way to allow such a gradient: it refuses it itself
        with pytest.raises(RuntimeError, match="dtype"):
            p.grad = torch.ones(3, dtype=torch.float64)
        return
    p.grad_dtype = None  # torch refuses such a gradient unless told to allow it
    p.grad = torch.ones(3, dtype=torch.float64)
    opt = Neumann([p], lr=0.1, **SHORT)
    with pytest.raises(RuntimeError, match="float64"):
        opt.step()
    assert len(opt.state) == 0
