"""The step under ``torch.compile(opt.step)``: a group's schedule as device tensors.

Eager steps decide each step's phase and momentum on the host from the group's counters (plain
ints and floats in ``param_groups``). Traced by dynamo, every such value becomes a guard, and the
counters change every step: the step recompiled along the schedule (15 graphs in 60 steps) and
fell back to eager past dynamo's recompile limit. Here the counters live in 0-d tensors on the
parameters' device and every phase is one branch-free form with scalar factors, as in
``neumann_optax``::

    d  = g + c (w - v)              c = alpha r - beta / r^3 on regular steps, else 0
    m' = a m - b d                  burn-in: a = 1, b = 0;  reset: a = 0, b = lr;  regular: a = mu, b = lr
    w' = w + mu m' - lr d           burn-in: mu = 0
    v' = v + k (w' - v)             burn-in: k = 0;  otherwise k = 1 - gamma

so one graph serves burn-in, the momentum ramp, every reset and the regular steps (a second one
covers the first step, which creates the state). With ``nonfinite="skip"`` a non-finite step writes
nothing back and is not counted, with no host synchronisation. The host counters in
``param_groups`` are brought up to date from the device when something reads them (``state_dict``,
``eval``/``train``, ``step_record``, a host-scheduled step): one synchronisation there, none per step.

The eager multi-tensor step on accelerators (``eager_step``) keeps the same device schedule, so that
with ``nonfinite="skip"`` it reads nothing on the host either: the finite check is a device flag (as
fused Adam's ``found_inf``), a skipped step's writes add zeros and multiply by ones
(:func:`functional.masked_update`), and the host counters are read every ``SYNC_EVERY`` steps of
the group or when something reads them.
"""

from __future__ import annotations

import math
from collections.abc import Set as AbstractSet
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import functional as F
from ._hyperparams import is_lean, real_numel, regularizer_scale
from ._nonfinite import finite_tensor, warn_skips
from ._paths import compile_failed, fused_fallback
from .functional import (
    low_precision,
    masked_update,
    squared_distance,
    squared_distance_and_diffs,
)
from .schedule import Phase, StepPlan, constant_momentum, momentum_at

# the eager multi-tensor step without host reads brings the host counters up to date (one read, with
# the skip warnings owed) every this many of a group's steps, besides whenever something reads them
SYNC_EVERY = 100

INT_KEYS = ("step", "next_reset", "reset_interval", "skipped_steps", "consecutive_skipped_steps")
PHASE_OF_CODE = {0: Phase.BURN_IN, 1: Phase.RESET, 2: Phase.NEUMANN}


def acc_dtype(params: list[Tensor]) -> torch.dtype:
    return torch.float64 if params[0].dtype == torch.float64 else torch.float32


def new_schedule(group: dict[str, Any], params: list[Tensor]) -> dict[str, Tensor]:
    """The group's counters as 0-d tensors on its parameters' device (taken from the host values),
    with what the last step did (``phase`` code, ``mu``, ``lr``, ``sq``; phase -1: none yet)."""
    dev, f = params[0].device, acc_dtype(params)
    sched = {k: torch.tensor(int(group[k]), dtype=torch.int64, device=dev) for k in INT_KEYS}
    sched["phase"] = torch.tensor(-1, dtype=torch.int64, device=dev)
    for k in ("lr", "sq"):
        sched[k] = torch.zeros((), dtype=f, device=dev)
    return sched


def refresh(sched: dict[str, Tensor], group: dict[str, Any]) -> None:
    """Copy the host counters into the device schedule (after eager steps or a load)."""
    for k in INT_KEYS:
        sched[k].fill_(int(group[k]))


class Scalars(NamedTuple):
    """One step's factors as 0-d device tensors (``lr`` may be a Python float), from the device
    schedule: the branch-free form of the module doc, before any masking by ``apply``."""

    lr: Tensor | float
    mu: Tensor  # the momentum of w's update (0 in burn-in)
    a: Tensor  # m's factor: 1 in burn-in, 0 at a reset, mu otherwise
    beta: Tensor  # 1 where m takes -lr d, 0 in burn-in
    k: Tensor  # v's step toward w: 0 in burn-in, 1 - gamma otherwise
    coef: Tensor  # c = alpha r - beta / r^3 on regular steps, else 0
    sq: Tensor  # ||w - v||^2 over the group (nan for the lean step)
    in_burn: Tensor
    is_reset: Tensor


def step_scalars(
    group: dict[str, Any],
    sched: dict[str, Tensor],
    sq: Tensor | None,
    n: int,
    f: torch.dtype,
    ok: Tensor | None = None,
) -> Scalars:
    """The factors of the group's next step from its device counters (no host read). ``sq``:
    ``||w - v||^2`` over the group (``None``: the lean step, or a step known to be in burn-in);
    ``n``: scalars in the group (``beta = repulsive_weight * n``). With ``ok`` (a 0-d bool), the
    factors of ``m``, ``w`` and ``v`` are the identity where it is false (``a = 1``, ``mu = k = 0``)."""
    lr = group["lr"]
    lr = lr.to(f) if isinstance(lr, Tensor) else lr
    s = sched["step"] + 1
    dev = s.device
    in_burn = s <= group["burn_in_steps"]
    t = s - group["burn_in_steps"]
    is_reset = torch.logical_and(torch.logical_not(in_burn), t == sched["next_reset"])
    bounds = group["momentum_bounds"]
    if bounds is not None:
        mu = (1.0 - 1.0 / (1.0 + t.to(f) / group["momentum_ramp_steps"])).clamp(bounds[0], bounds[1])
    else:  # written by a momentum-cycling scheduler (a new value recompiles)
        mu = torch.full((), constant_momentum(group["momentum"]), dtype=f, device=dev)
    zero, one = torch.zeros((), dtype=f, device=dev), torch.ones((), dtype=f, device=dev)
    mu = torch.where(in_burn, zero, mu)
    coef = zero
    if sq is not None:  # the regularizer: r over the group, c = alpha r - beta / r^3 on regular steps
        r = sq.to(f).sqrt()
        scale = regularizer_scale(group, lr)
        alpha, beta = scale * group["cubic_weight"], scale * group["repulsive_weight"] * n
        regular = torch.logical_not(torch.logical_or(in_burn, is_reset))
        active = regular & torch.isfinite(r) & (r > 0)
        safe = torch.where(active, r, one)
        coef = torch.where(active, alpha * safe - beta / (safe * safe * safe), zero)
    a = torch.where(in_burn, one, torch.where(is_reset, zero, mu))
    k = torch.where(in_burn, zero, one - group["ema_decay"])
    if ok is not None:
        a, mu, k = torch.where(ok, a, one), torch.where(ok, mu, zero), torch.where(ok, k, zero)
    return Scalars(
        lr=lr,
        mu=mu,
        a=a,
        beta=torch.where(in_burn, zero, one),
        k=k,
        coef=coef,
        sq=sq.to(f) if sq is not None else torch.full((), math.nan, dtype=f, device=dev),
        in_burn=in_burn,
        is_reset=is_reset,
    )


def advance(group: dict[str, Any], sched: dict[str, Tensor], sc: Scalars, apply: Tensor | None) -> None:
    """Move the device counters past one step (counted as skipped where ``apply`` is false)."""
    dev = sc.in_burn.device
    f = sc.mu.dtype
    one = torch.ones((), dtype=f, device=dev)
    applied = apply if apply is not None else torch.ones((), dtype=torch.bool, device=dev)
    reset_now = sc.is_reset & applied
    interval = sched["reset_interval"]
    grown = torch.clamp(torch.floor(group["reset_growth"] * interval.to(f)).to(torch.int64), min=1)
    code = torch.where(sc.in_burn, 0, torch.where(sc.is_reset, 1, 2))
    updates = {
        "step": sched["step"] + applied.to(torch.int64),
        "next_reset": torch.where(reset_now, sched["next_reset"] + interval, sched["next_reset"]),
        "reset_interval": torch.where(reset_now, grown, interval),
        "skipped_steps": sched["skipped_steps"] + torch.logical_not(applied).to(torch.int64),
        "consecutive_skipped_steps": torch.where(applied, 0, sched["consecutive_skipped_steps"] + 1),
        "phase": torch.where(applied, code, sched["phase"]),
        "lr": torch.where(applied, sc.lr * one, sched["lr"]),
        "sq": torch.where(applied, sc.sq, sched["sq"]),
    }
    for key, value in updates.items():
        sched[key].copy_(value)


def graph_step(
    group: dict[str, Any],
    sched: dict[str, Tensor],
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor] | None,
    apply: Tensor | None,
    n: int,
    check: bool = False,
) -> None:
    """One step of a group in the branch-free form (see the module doc), traced by torch.compile:
    each tensor's expressions fuse into one pass, and ``apply`` masks every write (a ``where``
    inside that pass); ``check``: ``apply`` is the gradients' finite check, reduced in the graph.
    ``vs=None``: the lean step. ``n``: scalars in the group."""
    f = acc_dtype(params)
    if check:
        apply = finite_tensor(grads)
    sq = None
    if vs is not None:
        sq = sum(((w.to(f) - v.to(f)) ** 2).sum() for w, v in zip(params, vs, strict=True))
    sc = step_scalars(group, sched, sq, n, f)  # type: ignore[arg-type]
    b = sc.beta * sc.lr
    wd = group["weight_decay"]

    def put(dst: Tensor, new: Tensor) -> None:
        new = new.to(dst.dtype)
        dst.copy_(new if apply is None else torch.where(apply, new, dst))

    for i, (w, g, m) in enumerate(zip(params, grads, ms, strict=True)):
        wf, gf, mf = w.to(f), g.to(f), m.to(f)
        if wd != 0.0:
            gf = gf + wd * wf
        vf = vs[i].to(f) if vs is not None else None
        d = gf if vf is None else gf + sc.coef * (wf - vf)
        m_new = sc.a * mf - b * d
        w_new = wf + sc.mu * m_new - sc.lr * d
        put(m, m_new)
        put(w, w_new)
        if vs is not None and vf is not None:
            put(vs[i], vf + sc.k * (w_new - vf))
    advance(group, sched, sc, apply)


def eager_step(
    group: dict[str, Any],
    sched: dict[str, Tensor],
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor] | None,
    ok: Tensor,
    n: int,
    burn_in: bool | None,
) -> Tensor:
    """One eager multi-tensor step with ``nonfinite="skip"`` and no host read: ``ok`` is the finite
    check's device flag, the schedule the device counters, and a skipped step writes nothing back
    (its ``-lr d`` is zeroed bit for bit and its factors made the identity). ``burn_in``: what the
    host knows of this step's phase from the counters' bounds (``None``: it cannot tell). Returns
    the group's ``||w - v||^2`` (nan where not summed), a device tensor."""
    f = acc_dtype(params)
    sq = diffs = None
    if vs is not None and burn_in is not True:
        if low_precision(params):
            sq = squared_distance(params, vs, True)
        else:
            sq, diffs = squared_distance_and_diffs(params, vs, True)
    sc = step_scalars(group, sched, sq, n, f, ok)
    # a tensor lr as a device tensor (a CPU one enters as a kernel argument, not a copy)
    nlr = -sc.lr if not isinstance(sc.lr, Tensor) else -(sc.lr * torch.ones((), dtype=f, device=ok.device))
    masked_update(
        params,
        grads,
        ms,
        vs if burn_in is not True else None,
        ok=ok,
        nlr=nlr,
        a=sc.a,
        beta=sc.beta,
        mu=sc.mu,
        k=sc.k,
        coef=sc.coef,
        weight_decay=group["weight_decay"],
        burn_in=burn_in,
        diffs=diffs,
    )
    advance(group, sched, sc, ok)
    return sc.sq


# what a compiled step reads of its group besides lr: constants of the group (their guards hold)
STATIC_KEYS = (
    "burn_in_steps",
    "momentum_bounds",
    "momentum_ramp_steps",
    "cubic_weight",
    "repulsive_weight",
    "ema_decay",
    "weight_decay",
    "reset_growth",
    "regularizer_schedule",
    "reference_lr",
)


def to_host(group: dict[str, Any], sched: dict[str, Tensor]) -> tuple[int, tuple[Any, ...] | None]:
    """Write the device counters into the host group if compiled steps moved them (one
    synchronisation); return how many steps were skipped since the host values were last written,
    and the last step's record ``(plan, lr, sq)`` (``None``: no compiled step since)."""
    ints = torch.stack([sched[k] for k in (*INT_KEYS, "phase")]).tolist()
    values = dict(zip((*INT_KEYS, "phase"), ints, strict=True))
    if values["step"] == group["step"] and values["skipped_steps"] == group["skipped_steps"]:
        # no step since the host counters were written, or only eager ones that applied (the host
        # counted them as it went): nothing to bring
        return 0, None
    lr, sq = torch.stack([sched["lr"], sched["sq"]]).tolist()
    newly_skipped = values["skipped_steps"] - group["skipped_steps"]
    for k in INT_KEYS:
        group[k] = values[k]
    if values["phase"] < 0:
        return newly_skipped, None
    # the momentum of the last step, recomputed on the host from its count (exactly as an eager step)
    t = group["step"] - group["burn_in_steps"]
    bounds = group["momentum_bounds"]
    if t >= 1:
        mu = momentum_at(t, group["momentum_ramp_steps"], *bounds) if bounds else constant_momentum(group["momentum"])
        group["last_momentum"] = mu
        if bounds is not None:
            group["momentum"] = mu
    phase = PHASE_OF_CODE[values["phase"]]
    plan = StepPlan(phase, group["last_momentum"] if phase is not Phase.BURN_IN else 0.0, 0)
    return newly_skipped, (plan, lr, sq if phase is Phase.NEUMANN else None)


def schedule_of(opt: Any, gi: int, params: list[Tensor]) -> dict[str, Tensor]:
    """Group ``gi``'s device schedule, created from its host counters at its first such step."""
    sched = opt._sched.get(gi)
    if sched is None:
        sched = opt._sched[gi] = new_schedule(opt.param_groups[gi], params)
    return sched


def device_update(
    opt: Any,
    gi: int,
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor] | None,
    compiled: bool,
) -> Tensor:
    """An eager step of group ``gi`` without host reads. ``compiled``: :func:`graph_step` as one graph
    the library compiles (``fused=True`` off the CPU kernel): one pass over each tensor, the skip a
    ``where`` in it, the group's constants compiled in and ``lr`` a 0-d tensor (a changing learning
    rate does not recompile); where compilation fails (before anything is written) it falls back as
    the host-scheduled path does. Otherwise :func:`eager_step`. The host counters advance as if the
    step applied and are corrected when read (:func:`sync_counters`). Returns the device
    ``||w - v||^2``."""
    group = opt.param_groups[gi]
    if gi not in opt._unsynced and gi in opt._sched:  # after compiled steps: the host counters first
        sync_counters(opt, only=gi)
    sched = schedule_of(opt, gi, params)
    pending = opt._unsynced[gi] = opt._unsynced.get(gi, 0) + 1
    # the host counts every step since the last read as applied, the device only those it applied
    hi, burn = group["step"] + 1, group["burn_in_steps"]
    burn_in = True if hi <= burn else False if hi - pending + 1 > burn else None
    n = sum(real_numel(p) for p in group["params"] if p.requires_grad)
    if compiled:
        f, lr = acc_dtype(params), group["lr"]
        static = {k: group[k] for k in STATIC_KEYS}
        # (groups of other constants get graphs of their own, not recompiles of one up to dynamo's limit)
        key = F._key("graph", params, vs is None, n, hash(tuple(static.values())))
        static["lr"] = lr.to(f) if isinstance(lr, Tensor) else torch.full((), lr, dtype=f, device=params[0].device)
        try:  # (the finite check in the graph: inductor reduces it faster than the eager kernels do)
            F._compiled(key, graph_step)(static, sched, params, grads, ms, vs, None, n, True)  # type: ignore[operator]
            return sched["sq"]
        except Exception as exc:
            if not compile_failed(exc):  # it failed while running: nothing to redo, tell the caller
                raise
            fused_fallback(opt, exc)  # compilation failed before anything was written
    return eager_step(group, sched, params, grads, ms, vs, finite_tensor(grads), n, burn_in)


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
