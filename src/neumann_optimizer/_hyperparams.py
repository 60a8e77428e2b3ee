"""Hyperparameters of the Neumann optimizer: validation, epoch-denominated defaults resolved per
parameter group, and the regularizer weights of a group's next step."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

from .functional import regularizer_coefficient
from .schedule import constant_momentum

NONFINITE_MODES = ("skip", "raise", "ignore")
# Group entries the optimizer keeps for itself (saved in state_dict()["param_groups"]).
COUNTERS = {
    "step": 0,  # s: number of applied steps
    "next_reset": 1,  # Neumann-phase step t of the next iterate reset
    "reset_interval": None,  # K_j, the current reset interval (filled from reset_steps)
    "last_momentum": 0.0,  # mu of the last applied step (evaluation weights w - mu m)
    # param_group["momentum"] itself is a float, as every momentum monitor expects: the mu of the
    # last step (0.0 before the first and during burn-in), or, once a scheduler wrote it, the mu
    # of the next step; the (mu_min, mu_max) of the ramp live in "momentum_bounds"
    "skipped_steps": 0,  # steps skipped for a non-finite gradient
    "consecutive_skipped_steps": 0,  # of those, how many in a row up to now
    "train_mode": True,  # False between eval() and train()
    "eval_shift": 0.0,  # mu subtracted in place by eval(evaluation="in_place"); train() adds it back
}
EVALUATION_MODES = ("exact", "in_place")


# epoch-denominated defaults (the paper's Table 1): name -> epochs
EPOCH_DEFAULTS = {"burn_in_steps": 5, "reset_steps": 10, "momentum_ramp_steps": 1}


def resolve_group(group: dict[str, Any], gi: int, defaults: dict[str, Any], explicit: set[str]) -> None:
    """Fill a new group's lr and step counts the way ``torch.optim`` resolves required values per
    group: the group's own value, else the optimizer's, else (step counts) epochs x the group's or
    the optimizer's ``steps_per_epoch``. A value that none of these gives is an error naming the group.

    ``explicit``: the step counts given to the optimizer in steps (those win over a group's own
    ``steps_per_epoch``; counts the optimizer derived from its ``steps_per_epoch`` do not).
    """
    if group.get("lr") is None:
        if defaults.get("lr") is None:
            raise ValueError(
                f"Neumann: param group {gi} has no lr and none was given to Neumann(); "
                "pass lr= to Neumann() or put it in every group"
            )
        group["lr"] = defaults["lr"]
    own_spe = group.get("steps_per_epoch")
    if own_spe is not None:
        check_int(f"steps_per_epoch (param group {gi})", own_spe, 1)
    spe = own_spe if own_spe is not None else defaults.get("steps_per_epoch")
    missing = []
    for name, epochs in EPOCH_DEFAULTS.items():
        if group.get(name) is not None:
            continue
        if name in explicit or (own_spe is None and defaults.get(name) is not None):
            group[name] = defaults[name]
        elif spe is not None:
            group[name] = epochs * spe
        else:
            missing.append(f"{name} ({epochs} epoch{'s' if epochs != 1 else ''})")
    if missing:  # all of them in one message, not one error at a time
        where = f" (param group {gi})" if gi else ""
        raise ValueError(
            f"Neumann: {', '.join(missing)} not given and neither is steps_per_epoch{where}; pass "
            "steps_per_epoch=len(train_loader) to use the paper's defaults (the epochs in brackets), "
            "or give each of them in steps, to Neumann() or to the group"
        )


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        if hasattr(value, "__len__") and not isinstance(value, (str, bytes)):  # a DataLoader, a dataset
            hint = "len(train_loader)" if name.startswith("steps_per_epoch") else "a number"
            raise ValueError(f"Neumann: {name} must be an int >= {minimum}, got a {type(value).__name__}; pass {hint}")
        raise ValueError(f"Neumann: {name} must be an int >= {minimum}, got {value!r}")


def check_float(name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high != math.inf else "")
        raise ValueError(f"Neumann: {name} must be a finite number {bound}, got {value!r}")


def validate_group(group: dict[str, Any]) -> None:
    """Check a group's values (``None``: not given at this level; resolved per group later)."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Neumann: a tensor lr must have exactly one element")
    elif lr is not None:
        check_float("lr", lr, 0.0)
    if group["burn_in_steps"] is not None:
        check_int("burn_in_steps", group["burn_in_steps"], 0)
    if group["reset_steps"] is not None:
        check_int("reset_steps", group["reset_steps"], 1)
    check_float("reset_growth", group["reset_growth"], 0.0, open_low=True)
    if group["momentum_ramp_steps"] is not None:
        check_float("momentum_ramp_steps", group["momentum_ramp_steps"], 0.0, open_low=True)
    mom = group["momentum"]
    if isinstance(mom, (tuple, list)):
        if len(mom) != 2:
            raise ValueError(f"Neumann: momentum must be a pair (mu_min, mu_max) or a number, got {mom!r}")
        check_float("momentum[0] (mu_min)", mom[0], 0.0, 1.0)
        check_float("momentum[1] (mu_max)", mom[1], 0.0, 1.0)
        if mom[0] > mom[1]:
            raise ValueError(f"Neumann: momentum must satisfy mu_min <= mu_max, got {tuple(mom)!r}")
        group["momentum"] = tuple(float(x) for x in mom)
    else:
        group["momentum"] = constant_momentum(mom)
    check_float("cubic_weight", group["cubic_weight"], 0.0)
    check_float("repulsive_weight", group["repulsive_weight"], 0.0)
    check_float("ema_decay", group["ema_decay"], 0.0, 1.0)
    check_float("weight_decay", group["weight_decay"], 0.0)
    if group.get("evaluation", "exact") not in EVALUATION_MODES:
        raise ValueError(f"Neumann: evaluation must be one of {EVALUATION_MODES}, got {group['evaluation']!r}")
    sched = group["regularizer_schedule"]
    if sched not in ("constant", "lr"):
        ok = isinstance(sched, (int, float)) and not isinstance(sched, bool) and math.isfinite(sched) and sched >= 0
        if not ok:
            raise ValueError(
                "Neumann: regularizer_schedule must be 'constant', 'lr' or a power p >= 0 "
                f"(alpha, beta scaled by (lr / initial lr) ** p), got {sched!r}"
            )


def split_momentum(group: dict[str, Any]) -> None:
    """Move a new group's validated ``momentum`` (a pair, or one number: the constant pair) to
    ``momentum_bounds`` and leave in ``momentum`` the mu of the last step (0.0: none yet)."""
    mom = group["momentum"]
    group["momentum_bounds"] = tuple(float(x) for x in mom) if isinstance(mom, (tuple, list)) else (mom, mom)
    group["momentum"] = float(group.get("last_momentum", 0.0))


def upgrade_momentum(group: dict[str, Any]) -> None:
    """A group saved by version 0.1 kept the pair in ``momentum``; a float there meant a constant
    mu (given, or written by a scheduler), which stays in charge as a scheduler's value does."""
    if "momentum_bounds" in group:
        return
    if isinstance(group["momentum"], (tuple, list)):
        split_momentum(group)
    else:
        group["momentum_bounds"] = None


def is_lean(group: dict[str, Any]) -> bool:
    """Both regularizers are 0: the group's step keeps no ``v`` and computes no norm (the lean step,
    Nesterov momentum in the displaced form, with the burn-in, ramp and resets)."""
    return group["cubic_weight"] == 0 and group["repulsive_weight"] == 0


def regularizer_scale(group: dict[str, Any], lr: Any = None) -> Any:
    """The factor on ``alpha`` and ``beta`` at the group's next step: 1 (``"constant"``, the
    paper), ``lr / reference_lr`` (``"lr"``) or ``(lr / reference_lr) ** p`` (a number ``p``).
    ``lr``: the learning rate to use (a tensor stays one, as inside a compiled step); default the
    group's, as a float."""
    sched = group["regularizer_schedule"]
    if sched == "constant" or group["reference_lr"] <= 0:
        return 1.0
    ratio = (float(group["lr"]) if lr is None else lr) / group["reference_lr"]
    return ratio if sched == "lr" else ratio ** float(sched)


def regularizer_weights(group: dict[str, Any]) -> tuple[float, float]:
    """``(alpha, beta)`` of a group's next regularized step: ``beta = repulsive_weight * n``, both
    scaled by :func:`regularizer_scale`."""
    scale = regularizer_scale(group)
    return scale * group["cubic_weight"], scale * group["repulsive_weight"] * group_numel(group)


def group_numel(group: dict[str, Any]) -> int:
    """``n``: the real scalars of a group's trainable parameters (a complex one counts twice)."""
    return sum(p.numel() * (2 if p.is_complex() else 1) for p in group["params"] if p.requires_grad)


def describe_step(step: int, plan: Any, lr: float, sq: Any, alpha: float, beta: float) -> dict[str, Any]:
    """:meth:`Neumann.step_record` from what a step kept: its plan, lr, ``||w - v||^2`` (a float, a
    0-d tensor or ``None``) and regularizer weights."""
    out: dict[str, Any] = dict(
        step=step,
        phase=plan.phase.value,
        lr=lr,
        momentum=plan.mu,
        distance=None,
        cubic_weight=alpha,
        repulsive_weight_total=beta,
        coefficient=None,
        repulsive_force=None,
        cubic_force=None,
    )
    if plan.phase.value == "neumann" and sq is not None:
        sq = float(sq)
        r = math.sqrt(sq) if sq >= 0 else math.nan
        ok = math.isfinite(r) and r > 0
        out.update(
            distance=r,
            coefficient=regularizer_coefficient(r, alpha, beta),
            repulsive_force=beta / r**2 if ok else 0.0,
            cubic_force=alpha * r**2 if ok else 0.0,
        )
    return out


def check_gradient(p: Tensor, name: Callable[[], str]) -> None:
    """A parameter's gradient is one the step supports, else a clear error naming it (``name()``)."""
    if p.grad.is_sparse:  # type: ignore[union-attr]
        raise RuntimeError(f"Neumann does not support sparse gradients ({name()})")
    if p.grad.is_complex() != p.is_complex():  # type: ignore[union-attr]
        raise RuntimeError(f"Neumann: gradient and {name()} differ in complexity")
    if p.device.type == "meta" or p.grad.device.type == "meta":  # type: ignore[union-attr]
        raise RuntimeError(
            f"Neumann: {name()} is on the meta device; materialise the parameters "
            "(e.g. module.to_empty(device=...) and initialise them) before the first step"
        )
    if p.grad.device != p.device or p.grad.dtype != p.dtype:  # type: ignore[union-attr]
        raise RuntimeError(
            f"Neumann: the gradient of {name()} is {p.grad.dtype} on {p.grad.device}, "  # type: ignore[union-attr]
            f"the parameter {p.dtype} on {p.device}; they must match"
        )
    if not p.is_floating_point() and not p.is_complex():
        raise RuntimeError(f"Neumann: {name()} is {p.dtype}; only float and complex")


def upgrade_group(group: dict[str, Any]) -> None:
    """The keys a group of an earlier version's state dict lacks, at their defaults; the counters."""
    for key, default in dict(
        nonfinite="skip", foreach=None, fused=None, capturable=False, regularizer_schedule="constant"
    ).items():
        group.setdefault(key, default)
    group.setdefault("evaluation", "exact")
    group.setdefault("reference_lr", float(group["lr"]))
    for key, count in COUNTERS.items():
        group.setdefault(key, group["reset_steps"] if key == "reset_interval" else count)
    upgrade_momentum(group)


def describe_groups(name: str, groups: list[dict[str, Any]]) -> str:
    """The optimizer's ``repr``: each group's hyperparameters and counters."""
    keys = ("lr", *EPOCH_DEFAULTS, "reset_growth", "momentum_bounds", "momentum", "cubic_weight")
    keys += ("repulsive_weight", "ema_decay", "weight_decay", "regularizer_schedule")
    lines = [f"{name} ("]
    for i, group in enumerate(groups):
        lines.append(f"Parameter Group {i}")
        lines += [f"    {k}: {group[k]}" for k in keys]
        lines.append(f"    step: {group['step']}  (skipped: {group['skipped_steps']})")
    return "\n".join([*lines, ")"])
