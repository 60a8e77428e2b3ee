"""Warnings for set-ups that run but do not train as the user expects: a burn-in that takes a large
share of a short run, and a scheduler that overrides the burn-in and the momentum ramp."""

from __future__ import annotations

import math
import warnings
from typing import Any

# the burn-in is warned about when it takes more than this share of a run's steps
BURN_IN_SHARE = 0.25


class ScheduleWarning(UserWarning):
    """The optimizer's own schedule (burn-in, momentum ramp) does not fit the run as set up."""


def check_run_length(groups: list[dict[str, Any]], total_steps: int) -> None:
    """Warn once per call when some group's burn-in (plain SGD steps) is more than a quarter of a
    run of ``total_steps`` steps, and say how to shorten it."""
    for gi, group in enumerate(groups):
        burn = int(group["burn_in_steps"])
        if burn > BURN_IN_SHARE * total_steps:
            where = f" of param group {gi}" if len(groups) > 1 else ""
            suggestion = max(1, total_steps // 20)
            warnings.warn(
                f"Neumann: the burn-in{where} is {burn} steps of plain SGD, {burn / total_steps:.0%} of this run's "
                f"{total_steps} steps; the Neumann steps start only after it (and the momentum ramps up over "
                f"momentum_ramp_steps after that). For a run this short, pass a shorter one, e.g. "
                f"burn_in_steps={suggestion} (5% of the run), with reset_steps and momentum_ramp_steps in steps too",
                ScheduleWarning,
                stacklevel=3,
            )
            return


def ramp_end(group: dict[str, Any]) -> float:
    """The group's step count at which its momentum ramp reaches mu_max (inf if it never does)."""
    bounds = group.get("momentum_bounds")
    if bounds is None:
        return 0.0
    mu_max = bounds[1]
    if mu_max >= 1.0:
        return math.inf
    # mu_t = 1 - 1 / (1 + t / tau) reaches mu_max at t = tau mu_max / (1 - mu_max)
    return group["burn_in_steps"] + group["momentum_ramp_steps"] * mu_max / (1.0 - mu_max)


def warn_scheduler_momentum(group: dict[str, Any], gi: int, n_groups: int) -> None:
    """A scheduler wrote ``param_group["momentum"]`` (the group follows it from now on): warn when that
    happens during the burn-in or the momentum ramp, which it then replaces."""
    if group["step"] >= ramp_end(group):
        return
    where = f" of param group {gi}" if n_groups > 1 else ""
    phase = "burn-in" if group["step"] < group["burn_in_steps"] else "momentum ramp"
    warnings.warn(
        f"Neumann: a scheduler wrote param_group['momentum']{where} during the {phase} (step {group['step']}), "
        f"so from now on the group takes that momentum instead of the burn-in's plain SGD and the "
        f"{group['momentum_bounds'][0]} -> {group['momentum_bounds'][1]} ramp. OneCycleLR and CyclicLR do this "
        "by default: pass cycle_momentum=False to keep Neumann's own schedule",
        ScheduleWarning,
        stacklevel=5,
    )
