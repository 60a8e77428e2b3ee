"""Step schedules of the Neumann optimizer (SPEC section 3): phases, momentum ramp, resets.

Everything here is plain integer/float arithmetic on the host: the optimizer counts the
steps it applied, so the phase of every step is known without looking at any tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class Phase(str, Enum):
    """What kind of update a step applies."""

    BURN_IN = "burn_in"  # plain SGD, s <= B
    RESET = "reset"  # Neumann iterate reset: m <- -eta g (no regularizer)
    NEUMANN = "neumann"  # regularized Nesterov-form step


def momentum_at(t: int, ramp_steps: float, mu_min: float, mu_max: float) -> float:
    """``mu_t = clip(1 - 1/(1 + t/tau), mu_min, mu_max)`` for Neumann-phase step ``t >= 1``.

    With ``tau = steps_per_epoch`` this is 0.5 after one epoch and 0.9 from nine epochs on
    (Table 1 of the paper: "starting at 0.5 and peaking at 0.9").
    """
    raw = 1.0 - 1.0 / (1.0 + t / ramp_steps)
    return min(max(raw, mu_min), mu_max)


def next_reset_interval(interval: int, growth: float) -> int:
    """``K_{j+1} = max(1, floor(growth * K_j))``."""
    return max(1, math.floor(growth * interval))


@dataclass(frozen=True)
class StepPlan:
    """The phase and momentum of one step, decided before any tensor is touched."""

    phase: Phase
    momentum: float  # mu used by this step (0.0 during burn-in)
    t: int  # Neumann-phase step index (0 during burn-in)


def plan_step(applied_steps: int, burn_in_steps: int, next_reset: int, group: dict) -> StepPlan:
    """Decide step ``s = applied_steps + 1`` of a group (pure; does not change any counter)."""
    s = applied_steps + 1
    if s <= burn_in_steps:
        return StepPlan(Phase.BURN_IN, 0.0, 0)
    t = s - burn_in_steps
    bounds = group["momentum_bounds"]
    if bounds is not None:
        mu = momentum_at(t, group["momentum_ramp_steps"], bounds[0], bounds[1])
    else:  # written by a momentum-cycling scheduler (OneCycleLR, CyclicLR): the mu of this step
        mu = constant_momentum(group["momentum"])
    return StepPlan(Phase.RESET if t == next_reset else Phase.NEUMANN, mu, t)


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
