"""Non-finite gradients, per parameter group (the ``nonfinite`` option: ``"skip"``, ``"raise"`` or
``"ignore"``).

Each group is checked by its own gradients and handled by its own mode: a ``"skip"`` group with an
inf or NaN gradient leaves its weights and state untouched and counts the skip in its own
``skipped_steps``, while the other groups of the optimizer take their step; a ``"raise"`` group
raises before any group is written.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from . import _native
from ._distributed import all_ranks_true, local_tensor
from ._paths import _wants_native

# a run of this many consecutive skipped steps of a group gets a DivergedWarning
DIVERGED_AFTER = 100

# (group index, indices of the params with grads, those params, their grads), as Neumann gathers them
Gathered = tuple[int, list[int], list[Tensor], list[Tensor]]


class DivergedWarning(RuntimeWarning):
    """Many consecutive steps had non-finite gradients and were skipped: the run has diverged.
    ``warnings.simplefilter("error", DivergedWarning)`` turns it into an exception."""


def finite_flags(entries: list[Gathered], groups: list[dict[str, Any]], local: Any) -> list[bool]:
    """Per entry: no inf or NaN in its group's gradients. One read of every gradient and at most
    one host synchronisation for all groups together (none for the CPU kernel's check).
    ``local(gi, tensors)`` gives the real local tensors of group ``gi``."""
    flags: list[bool | None] = [None] * len(entries)
    device_flags: list[tuple[int, Tensor]] = []
    for k, (gi, _, _, gs) in enumerate(entries):
        grads = local(gi, gs)
        if _wants_native(groups[gi]) and _native.usable(grads):
            flags[k] = _native.all_finite(grads)  # one C pass, stops at the first
            continue
        device_flags.append((k, finite_tensor(grads)))
    if device_flags:
        dev = device_flags[0][1].device
        values = torch.stack([f.to(dev) for _, f in device_flags]).tolist()  # the one host read
        for (k, _), ok in zip(device_flags, values, strict=True):
            flags[k] = bool(ok)
    # a sharded gradient may be non-finite on one rank only: agree across ranks, group by group
    return [all_ranks_true(bool(ok), entry[2]) for ok, entry in zip(flags, entries, strict=True)]


def finite_tensor(grads: list[Tensor]) -> Tensor:
    """A 0-d bool tensor: no inf or NaN in ``grads`` (no host read; as fused Adam's ``found_inf``).

    From each tensor's largest magnitude (the infinity norm), which is finite iff every element
    is, in any dtype: a sum or an L1 norm overflows (float16 past 65,504) while every element is
    finite. Eagerly one multi-tensor launch; under ``torch.compile`` a max per tensor, which
    inductor fuses."""
    if not grads:
        return torch.ones((), dtype=torch.bool)
    if torch.compiler.is_compiling():  # (amax has no value for an empty tensor; the norm gives 0)
        peaks = [g.abs().amax().float() for g in grads if g.numel()] or [torch.zeros((), device=grads[0].device)]
    else:
        wide = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        peaks = list(torch._foreach_norm(grads, math.inf, dtype=wide))
    return torch.isfinite(torch.stack(peaks)).all()


def raise_nonfinite(entry: Gathered, name: Any) -> None:
    """Raise ``FloatingPointError`` naming the first parameter of ``entry`` whose gradient is not
    finite (``name(gi, pi)`` describes it)."""
    gi, idx, _, gs = entry
    for pi, g in zip(idx, gs, strict=True):
        if not bool(torch.isfinite(local_tensor(g)).all()):
            raise FloatingPointError(f"Neumann: non-finite gradient in {name(gi, pi)}")
    raise FloatingPointError(f"Neumann: non-finite gradient in param group {gi} on another rank")


def count_skip(group: dict[str, Any], gi: int, n_groups: int) -> None:
    """Count a skipped step of one group; warn at its 1st, 10th, 100th, ... skip, and once when its
    run of consecutive skips reaches ``DIVERGED_AFTER`` (a :class:`DivergedWarning`)."""
    group["skipped_steps"] += 1
    group["consecutive_skipped_steps"] += 1
    warn_skips(group, gi, n_groups, group["skipped_steps"] - 1, 1)


def warn_skips(group: dict[str, Any], gi: int, n_groups: int, before: int, newly: int) -> None:
    """The warnings that ``newly`` skips after ``before`` earlier ones owe (counted already in the
    group): at the 1st, 10th, 100th, ... skip, and when the run of consecutive skips reached
    ``DIVERGED_AFTER``. Compiled steps count on the device and are warned for when read back."""
    if newly <= 0:
        return
    total, streak = group["skipped_steps"], group["consecutive_skipped_steps"]
    where = f" of param group {gi}" if n_groups > 1 else ""
    if any(before < 10**j <= total for j in range(19)):  # crossed a power of ten
        warnings.warn(
            f"Neumann: non-finite gradient, step{where} skipped (weights and state untouched); "
            f"{total} skipped so far (warned at 1, 10, 100, ... skips; the count is "
            f"param_groups[{gi}]['skipped_steps'])",
            RuntimeWarning,
            stacklevel=4,
        )
    if streak >= DIVERGED_AFTER > streak - newly:
        warnings.warn(
            f"Neumann: {DIVERGED_AFTER} consecutive steps{where} had non-finite gradients and were skipped: the run "
            "has diverged (lower the learning rate or check the loss); nonfinite='raise' stops at the first",
            DivergedWarning,
            stacklevel=4,
        )
