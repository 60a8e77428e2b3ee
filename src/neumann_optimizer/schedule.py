"""Step schedules of the Neumann optimizer (SPEC section 3): phases, momentum ramp, resets.

One schedule for every path: :func:`factors` turns a group's counters into the step's factors and
:func:`advance` moves the counters, on Python numbers (the host schedule: the optimizer counts the
steps it applied, so every step's phase is known without looking at a tensor) or on 0-d tensors
(the device schedule of ``torch.compile(opt.step)``, ``fused=True`` and ``capturable=True``).
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, NamedTuple

import torch
from torch import Tensor


class Phase(str, Enum):
    """What kind of update a step applies."""

    BURN_IN = "burn_in"  # plain SGD, s <= B
    RESET = "reset"  # Neumann iterate reset: m <- -eta g (no regularizer)
    NEUMANN = "neumann"  # regularized Nesterov-form step


def next_reset_interval(interval: int, growth: float) -> int:
    """``K_{j+1} = max(1, floor(growth * K_j))``."""
    return max(1, math.floor(growth * interval))


class Ops:
    """The arithmetic :func:`factors` and :func:`advance` use, on Python numbers (this class: the
    host schedule) or on 0-d tensors (:class:`TensorOps`: the device schedule). One schedule, written
    once, serves every path."""

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return a if cond else b

    def and_(self, a: Any, b: Any) -> Any:
        return a and b

    def not_(self, a: Any) -> Any:
        return not a

    def clamp(self, x: Any, lo: float, hi: float) -> Any:
        return min(max(x, lo), hi)

    def real(self, x: Any) -> Any:
        return float(x)

    def grown(self, interval: Any, growth: float) -> Any:
        return next_reset_interval(interval, growth)


class TensorOps(Ops):
    """:class:`Ops` on 0-d tensors of one device; reals in ``dtype``."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device

    def _t(self, x: Any) -> Tensor:
        return x if isinstance(x, Tensor) else torch.full((), x, dtype=self.dtype, device=self.device)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        if isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype:
            return torch.where(cond, a, b)
        return torch.where(cond, self._t(a), self._t(b))

    def and_(self, a: Any, b: Any) -> Any:
        return torch.logical_and(a, b)

    def not_(self, a: Any) -> Any:
        return torch.logical_not(a)

    def clamp(self, x: Any, lo: float, hi: float) -> Any:
        return x.clamp(lo, hi)

    def real(self, x: Any) -> Any:
        return x.to(self.dtype)

    def grown(self, interval: Any, growth: float) -> Any:
        return torch.clamp(torch.floor(growth * interval.to(self.dtype)).to(torch.int64), min=1)


HOST = Ops()


def momentum_at(t: Any, ramp_steps: float, mu_min: float, mu_max: float, ops: Ops = HOST) -> Any:
    """``mu_t = clip(1 - 1/(1 + t/tau), mu_min, mu_max)`` for Neumann-phase step ``t >= 1``.

    With ``tau = steps_per_epoch`` this is 0.5 after one epoch and 0.9 from nine epochs on
    (Table 1 of the paper: "starting at 0.5 and peaking at 0.9").
    """
    return ops.clamp(1.0 - 1.0 / (1.0 + ops.real(t) / ramp_steps), mu_min, mu_max)


class Factors(NamedTuple):
    """One step's schedule in the branch-free form every path applies (SPEC section 3)::

        m' = a m - beta lr d;   w' = w + mu m' - lr d;   v' = v + k (w' - v)

    burn-in: a = 1, beta = 0, mu = 0, k = 0;  reset: a = 0, beta = 1;  regular: a = mu, beta = 1."""

    in_burn: Any
    is_reset: Any
    t: Any  # the Neumann-phase step index (<= 0 in burn-in)
    mu: Any
    a: Any
    beta: Any
    k: Any

    @property
    def phase(self) -> Phase:
        """The phase, where the factors are Python values."""
        return Phase.BURN_IN if self.in_burn else Phase.RESET if self.is_reset else Phase.NEUMANN


def factors(step: Any, next_reset: Any, group: dict, ops: Ops = HOST) -> Factors:
    """The factors of the step after ``step`` applied steps of ``group`` (its counters: Python ints,
    or 0-d int64 tensors with ``ops`` a :class:`TensorOps`), changing nothing."""
    s = step + 1
    in_burn = s <= group["burn_in_steps"]
    t = s - group["burn_in_steps"]
    is_reset = ops.and_(ops.not_(in_burn), t == next_reset)
    bounds = group["momentum_bounds"]
    if bounds is not None:  # (in burn-in the ramp is not used: t = 1 there keeps 1 + t/tau away from 0)
        mu = momentum_at(ops.where(in_burn, 1, t), group["momentum_ramp_steps"], bounds[0], bounds[1], ops)
    else:  # written by a momentum-cycling scheduler (OneCycleLR, CyclicLR): the mu of this step
        mu = constant_momentum(group["momentum"])
    mu = ops.where(in_burn, 0.0, mu)
    return Factors(
        in_burn=in_burn,
        is_reset=is_reset,
        t=t,
        mu=mu,
        a=ops.where(in_burn, 1.0, ops.where(is_reset, 0.0, mu)),
        beta=ops.where(in_burn, 0.0, 1.0),
        k=ops.where(in_burn, 0.0, 1.0 - group["ema_decay"]),
    )


COUNTER_KEYS = ("step", "next_reset", "reset_interval", "skipped_steps", "consecutive_skipped_steps")


def advance(counters: dict, is_reset: Any, applied: Any, growth: float, ops: Ops = HOST) -> dict:
    """The counters after one step (``applied`` false: counted as skipped, nothing else moves)."""
    c = counters
    reset_now = ops.and_(is_reset, applied)
    return {
        "step": ops.where(applied, c["step"] + 1, c["step"]),
        "next_reset": ops.where(reset_now, c["next_reset"] + c["reset_interval"], c["next_reset"]),
        "reset_interval": ops.where(reset_now, ops.grown(c["reset_interval"], growth), c["reset_interval"]),
        "skipped_steps": ops.where(applied, c["skipped_steps"], c["skipped_steps"] + 1),
        "consecutive_skipped_steps": ops.where(applied, 0 * c["step"], c["consecutive_skipped_steps"] + 1),
    }


def scheduler_wrote_momentum(group: dict) -> bool:
    """Whether something other than the optimizer wrote ``group["momentum"]`` since the last step:
    the optimizer leaves the mu it used there (``== group["last_momentum"]``) while it follows its
    ramp. From the first such write on, the group's ``momentum`` is the mu of each next step."""
    return group["momentum"] != group["last_momentum"]


def constant_momentum(mom: object) -> float:
    """A group's ``momentum`` given as one number: checked to be a finite float in [0, 1]."""
    ok = isinstance(mom, (int, float)) and not isinstance(mom, bool)
    mu = float(mom) if ok else math.nan  # type: ignore[arg-type]
    if not (0.0 <= mu <= 1.0):
        raise ValueError(
            f"Neumann: momentum must be a pair (mu_min, mu_max) or a number in [0, 1], got {mom!r} "
            "(a scheduler that cycles momentum writes param_group['momentum'])"
        )
    return mu


def reset_steps_until(t_max: int, first_interval: int, growth: float) -> list[int]:
    """All Neumann-phase steps ``t <= t_max`` that reset the iterate: 1, 1+K0, 1+K0+K1, ..."""
    out: list[int] = []
    t, k = 1, first_interval
    while t <= t_max:
        out.append(t)
        t += k
        k = next_reset_interval(k, growth)
    return out
