"""The device-scheduled step: a group's counters as 0-d tensors on its parameters' device.

The host-scheduled paths decide each step's factors from the group's counters (plain ints in
``param_groups``). Traced by dynamo, every such value becomes a guard and the counters change every
step, so ``torch.compile(opt.step)`` would recompile along the schedule. Here the counters live in 0-d
tensors and :func:`graph_step` applies the branch-free form of :class:`schedule.Factors` (the same
:func:`schedule.factors` and :func:`schedule.advance` the host schedule runs, on tensors), so one
graph serves burn-in, the ramp, every reset and the regular steps (a second one covers the first
step, which creates the state). With ``nonfinite="skip"`` a non-finite step writes nothing back and
is not counted, with no host read.

It runs three ways: traced inside ``torch.compile(opt.step)``; compiled by the library for
``fused=True`` off the CPU kernel (one pass over each tensor); and eagerly for ``capturable=True``
(no host read: a CUDA graph can capture it). The host counters in ``param_groups`` advance as if
every such step applied and are brought up to date from the device (one read, with the skip
warnings owed) every ``SYNC_EVERY`` steps of the group and whenever something reads them
(``state_dict``, ``eval``/``train``, ``step_record``, a host-scheduled step).
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any

import torch
from torch import Tensor

from . import functional as F
from ._hyperparams import group_numel, is_lean, regularizer_scale
from ._nonfinite import finite_tensor, warn_skips
from .schedule import COUNTER_KEYS, HOST, Phase, TensorOps, advance, factors

SYNC_EVERY = 100  # a device-scheduled group's host counters are read at least this often (its steps)
PHASE_OF_CODE = {0: Phase.BURN_IN, 1: Phase.RESET, 2: Phase.NEUMANN}


def acc_dtype(params: list[Tensor]) -> torch.dtype:
    return torch.float64 if params[0].dtype == torch.float64 else torch.float32


def new_schedule(group: dict[str, Any], params: list[Tensor]) -> dict[str, Tensor]:
    """The group's counters as 0-d tensors on its parameters' device (from the host values), with
    what the last step did (``phase`` code, ``lr``, ``sq``; phase -1: none yet)."""
    dev, f = params[0].device, acc_dtype(params)
    sched = {k: torch.tensor(int(group[k]), dtype=torch.int64, device=dev) for k in COUNTER_KEYS}
    sched["phase"] = torch.tensor(-1, dtype=torch.int64, device=dev)
    for k in ("lr", "sq"):
        sched[k] = torch.zeros((), dtype=f, device=dev)
    return sched


def refresh(sched: dict[str, Tensor], group: dict[str, Any]) -> None:
    """Copy the host counters into the device schedule (after host-scheduled steps or a load)."""
    for k in COUNTER_KEYS:
        sched[k].fill_(int(group[k]))


def graph_step(
    group: dict[str, Any],
    sched: dict[str, Tensor],
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor] | None,
) -> None:
    """One step of a group in the branch-free form, with its schedule on the device: compiled, each
    tensor's expressions fuse into one pass. ``group["check"]``: the gradients' finite check, computed
    here, masks every write (a ``where`` inside that pass). ``vs=None``: the lean step.
    ``group["n"]``: scalars in the group (``beta = repulsive_weight * n``). Low-precision tensors are
    computed in float32 and rounded once."""
    f = acc_dtype(params)
    dev = params[0].device
    ops = TensorOps(f, dev)
    apply = finite_tensor(grads) if group["check"] else None
    fac = factors(sched["step"], sched["next_reset"], group, ops)
    lr = group["lr"]
    lr = lr.to(f) if isinstance(lr, Tensor) else torch.full((), lr, dtype=f, device=dev)
    coef, sq = ops._t(0.0), ops._t(math.nan)
    if vs is not None:  # the regularizer, on regular steps: r over the group, c = alpha r - beta / r^3
        sq = F.squared_distance(params, vs, foreach=not torch.compiler.is_compiling())
        scale = regularizer_scale(group, lr)
        c = F.regularizer_coefficient(
            sq.sqrt(), scale * group["cubic_weight"], scale * group["repulsive_weight"] * group["n"]
        )
        coef = torch.where(ops.not_(fac.in_burn | fac.is_reset), c, coef)
    b = fac.beta * lr
    wd = group["weight_decay"]

    def put(dst: Tensor, new: Tensor) -> None:
        new = new.to(dst.dtype)
        dst.copy_(new if apply is None else torch.where(apply, new, dst))

    for i, (w, g, m) in enumerate(zip(params, grads, ms, strict=True)):
        wf, gf, mf = w.to(f), g.to(f), m.to(f)
        if wd != 0.0:
            gf = gf + wd * wf
        vf = vs[i].to(f) if vs is not None else None
        d = gf if vf is None else gf + coef * (wf - vf)
        m_new = fac.a * mf - b * d
        w_new = wf + fac.mu * m_new - lr * d
        put(m, m_new)
        put(w, w_new)
        if vs is not None and vf is not None:
            put(vs[i], vf + fac.k * (w_new - vf))
    applied = apply if apply is not None else torch.ones((), dtype=torch.bool, device=dev)
    moved = advance({k: sched[k] for k in COUNTER_KEYS}, fac.is_reset, applied, group["reset_growth"], ops)
    moved["phase"] = torch.where(applied, torch.where(fac.in_burn, 0, torch.where(fac.is_reset, 1, 2)), sched["phase"])
    moved["lr"] = torch.where(applied, lr, sched["lr"])
    moved["sq"] = torch.where(applied, sq, sched["sq"])
    for key, value in moved.items():
        sched[key].copy_(value)


def to_host(group: dict[str, Any], sched: dict[str, Tensor]) -> tuple[int, tuple[Any, ...] | None]:
    """Write the device counters into the host group (one read); return how many steps were skipped
    since the host values were last written, and the last step's record ``(factors, lr, sq)`` (``None``:
    no device step since). The record's momentum comes from the same :func:`schedule.factors`."""
    ints = torch.stack([sched[k] for k in (*COUNTER_KEYS, "phase")]).tolist()
    values = dict(zip((*COUNTER_KEYS, "phase"), ints, strict=True))
    if values["step"] == group["step"] and values["skipped_steps"] == group["skipped_steps"]:
        return 0, None  # no device step since the host counters were written
    lr, sq = torch.stack([sched["lr"], sched["sq"]]).tolist()
    newly_skipped = values["skipped_steps"] - group["skipped_steps"]
    for k in COUNTER_KEYS:
        group[k] = values[k]
    if values["phase"] < 0:
        return newly_skipped, None
    last = factors(group["step"] - 1, -1, group, HOST)  # (its phase is the one the device recorded)
    if last.t >= 1:
        group["last_momentum"] = last.mu
        if group["momentum_bounds"] is not None:
            group["momentum"] = last.mu
    phase = PHASE_OF_CODE[values["phase"]]
    rec = last._replace(in_burn=phase is Phase.BURN_IN, is_reset=phase is Phase.RESET)
    return newly_skipped, (rec, lr, sq if phase is Phase.NEUMANN else None)


def schedule_of(opt: Any, gi: int, params: list[Tensor]) -> dict[str, Tensor]:
    """Group ``gi``'s device schedule, created from its host counters at its first such step."""
    sched = opt._sched.get(gi)
    if sched is None:
        sched = opt._sched[gi] = new_schedule(opt.param_groups[gi], params)
    return sched


# what a compiled step reads of its group besides lr: constants of the group (their guards hold)
# ("momentum" is read only where a scheduler took the momentum over: momentum_bounds None)
STATIC_KEYS = ["burn_in_steps", "momentum_bounds", "momentum", "momentum_ramp_steps", "cubic_weight"]
STATIC_KEYS += ["repulsive_weight", "ema_decay", "weight_decay", "reset_growth", "regularizer_schedule", "reference_lr"]
_COMPILED: dict[tuple, Callable[..., Any]] = {}


def _compiled(key: tuple) -> Callable[..., Any]:
    """A compiled copy of :func:`graph_step`, one per ``key``: dynamo caches graphs per code object
    and caps them (``recompile_limit``), so every group shape gets its own code object."""
    fn = _COMPILED.get(key)
    if fn is None:
        tag = "_".join(str(k).replace(".", "_").replace("-", "m") for k in key)
        code = graph_step.__code__.replace(co_name=f"graph_step_{tag}")
        copy = types.FunctionType(code, graph_step.__globals__, code.co_name, graph_step.__defaults__)
        fn = _COMPILED[key] = torch.compile(copy, fullgraph=True, dynamic=False, options={"size_asserts": False})
    return fn


def constants_of(group: dict[str, Any]) -> dict[str, Any]:
    """What :func:`graph_step` reads of a group: its constants (``STATIC_KEYS``), ``lr``, ``n`` and
    ``check`` (``nonfinite="skip"``: the finite check masks the writes)."""
    static = {k: group[k] for k in STATIC_KEYS}
    if group["momentum_bounds"] is not None:  # (the ramp's mu is computed; the host's reported one changes)
        del static["momentum"]
    return dict(static, lr=group["lr"], n=group_numel(group), check=group["nonfinite"] == "skip")


def device_update(
    opt: Any,
    gi: int,
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor] | None,
    compiled: bool,
) -> Tensor:
    """A step of group ``gi`` on its device schedule, outside ``torch.compile(opt.step)``:
    ``compiled`` (``fused=True``): :func:`graph_step` as one graph the library compiles, the group's
    constants compiled in and ``lr`` a 0-d tensor (a changing learning rate does not recompile);
    where compilation fails (before anything is written) the group falls back to the multi-tensor
    step with a warning. Otherwise (``capturable=True``) :func:`graph_step` eagerly. With
    ``nonfinite="skip"`` the finite check is a device flag; the host counters advance as if the step
    applied and are corrected when read (:func:`sync_counters`). Returns the step's ``||w - v||^2``
    (a device tensor, nan where not summed)."""
    group = opt.param_groups[gi]
    if gi not in opt._unsynced and gi in opt._sched:  # after steps traced by dynamo: the host counters first
        sync_counters(opt, only=gi)
    sched = schedule_of(opt, gi, params)
    opt._unsynced[gi] = opt._unsynced.get(gi, 0) + 1
    static = constants_of(group)
    key = hash(repr({k: v for k, v in static.items() if k != "lr"}))  # (other constants: graphs of their own)
    lr, f = static["lr"], acc_dtype(params)
    static["lr"] = lr.to(f) if isinstance(lr, Tensor) else torch.full((), lr, dtype=f, device=params[0].device)
    if compiled:
        shapes = hash(tuple(tuple(t.shape) for t in params))
        ckey = (len(params), params[0].dtype, params[0].device.type, shapes, vs is None, key)
        try:
            F.neumann(params, grads, ms, vs, schedule=sched, constants=static, compile_key=ckey)
            return sched["sq"].clone()
        except Exception as exc:
            if not compile_failed(exc):  # it failed while running: nothing to redo, tell the caller
                raise
            fused_fallback(opt, exc)  # compilation failed before anything was written
    F.neumann(params, grads, ms, vs, schedule=sched, constants=static)
    return sched["sq"].clone()


def compile_failed(exc: BaseException) -> bool:
    """``exc`` comes from compiling the graph (dynamo's tracing or the backend's compiler), which
    happens before the graph runs, so nothing was written; an error raised while the compiled graph
    runs (out of memory, say) is not one of these."""
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(exc, TorchDynamoException)


def fused_fallback(opt: Any, exc: Exception) -> None:
    opt._fused_failed = True
    warnings.warn(
        f"Neumann: the fused (torch.compile) path failed ({type(exc).__name__}: {exc}); "
        "falling back to the multi-tensor path",
        RuntimeWarning,
        stacklevel=6,
    )


def sync_counters(opt: Any, skip: AbstractSet[int] = frozenset(), only: int | None = None) -> None:
    """Write the device counters of ``opt``'s device-scheduled groups into their host counters (one
    read per group), with the skip warnings owed; groups in ``skip`` (or other than ``only``) are
    left for later."""
    for gi, sched in opt._sched.items():
        if gi in skip or only not in (None, gi) or opt._unsynced.get(gi) == 0:
            continue  # (0: no device step since host and device last agreed, nothing to read)
        opt._unsynced[gi] = 0  # (host and device counters agree from here)
        group = opt.param_groups[gi]
        before = group["skipped_steps"]
        newly_skipped, rec = to_host(group, sched)
        warn_skips(group, gi, len(opt.param_groups), before, newly_skipped)
        if rec is not None:  # (a lean step summed no norm)
            lean = is_lean(group)
            opt._records[gi] = (rec[0], rec[1], None if lean else rec[2], None, lean)
