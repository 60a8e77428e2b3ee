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
``eval``/``train``, ``step_record``, an eager step): one synchronisation there, none per step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._hyperparams import regularizer_scale
from .schedule import Phase, StepPlan, constant_momentum, momentum_at

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


def graph_step(
    group: dict[str, Any],
    sched: dict[str, Tensor],
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor] | None,
    apply: Tensor | None,
    n: int,
) -> None:
    """One step of a group in the branch-free form (see the module doc); ``vs=None``: the lean step.
    ``n``: scalars in the group (``beta = repulsive_weight * n``)."""
    f = acc_dtype(params)
    lr = group["lr"]
    lr = lr.to(f) if isinstance(lr, Tensor) else lr
    s = sched["step"] + 1
    in_burn = s <= group["burn_in_steps"]
    t = s - group["burn_in_steps"]
    is_reset = torch.logical_and(torch.logical_not(in_burn), t == sched["next_reset"])
    bounds = group["momentum_bounds"]
    if bounds is not None:
        mu = (1.0 - 1.0 / (1.0 + t.to(f) / group["momentum_ramp_steps"])).clamp(bounds[0], bounds[1])
    else:  # written by a momentum-cycling scheduler (a new value recompiles)
        mu = torch.full((), constant_momentum(group["momentum"]), dtype=f, device=s.device)
    zero, one = torch.zeros((), dtype=f, device=s.device), torch.ones((), dtype=f, device=s.device)
    mu = torch.where(in_burn, zero, mu)
    coef, sq = zero, torch.full((), math.nan, dtype=f, device=s.device)
    if vs is not None:  # the regularizer: r over the group, c = alpha r - beta / r^3 on regular steps
        sq = sum(((w.to(f) - v.to(f)) ** 2).sum() for w, v in zip(params, vs, strict=True))  # type: ignore[assignment]
        r = sq.sqrt()
        scale = regularizer_scale(group, lr)
        alpha, beta = scale * group["cubic_weight"], scale * group["repulsive_weight"] * n
        regular = torch.logical_not(torch.logical_or(in_burn, is_reset))
        ok = regular & torch.isfinite(r) & (r > 0)
        safe = torch.where(ok, r, one)
        coef = torch.where(ok, alpha * safe - beta / (safe * safe * safe), zero)
    a = torch.where(in_burn, one, torch.where(is_reset, zero, mu))
    b = torch.where(in_burn, zero, one) * lr
    k = torch.where(in_burn, zero, one - group["ema_decay"])
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
        m_new = a * mf - b * d
        w_new = wf + mu * m_new - lr * d
        put(m, m_new)
        put(w, w_new)
        if vs is not None and vf is not None:
            put(vs[i], vf + k * (w_new - vf))

    applied = apply if apply is not None else torch.ones((), dtype=torch.bool, device=s.device)
    reset_now = is_reset & applied
    interval = sched["reset_interval"]
    grown = torch.clamp(torch.floor(group["reset_growth"] * interval.to(f)).to(torch.int64), min=1)
    code = torch.where(in_burn, 0, torch.where(is_reset, 1, 2))
    updates = {
        "step": sched["step"] + applied.to(torch.int64),
        "next_reset": torch.where(reset_now, sched["next_reset"] + interval, sched["next_reset"]),
        "reset_interval": torch.where(reset_now, grown, interval),
        "skipped_steps": sched["skipped_steps"] + torch.logical_not(applied).to(torch.int64),
        "consecutive_skipped_steps": torch.where(applied, 0, sched["consecutive_skipped_steps"] + 1),
        "phase": torch.where(applied, code, sched["phase"]),
        "lr": torch.where(applied, lr * one, sched["lr"]),
        "sq": torch.where(applied, sq.to(f), sched["sq"]),
    }
    for key, value in updates.items():
        sched[key].copy_(value)


def to_host(group: dict[str, Any], sched: dict[str, Tensor]) -> tuple[int, tuple[Any, ...] | None]:
    """Write the device counters into the host group if compiled steps moved them (one
    synchronisation); return how many steps were skipped since the host values were last written,
    and the last step's record ``(plan, lr, sq)`` (``None``: no compiled step since)."""
    ints = torch.stack([sched[k] for k in (*INT_KEYS, "phase")]).tolist()
    values = dict(zip((*INT_KEYS, "phase"), ints, strict=True))
    if values["step"] + values["skipped_steps"] == group["step"] + group["skipped_steps"]:
        return 0, None  # no compiled step since the host counters were written: nothing to bring
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
