"""Which body a group's step takes (the CPU kernel, multi-tensor, for-loop, or the device-scheduled
graph of ``_graph_step``), and the small helpers those paths share."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _native
from . import functional as F
from ._distributed import all_reduce_squared_norm
from .schedule import Factors


def _wants_native(group: dict[str, Any]) -> bool:
    """``fused=True``, or the default (``fused=None`` and ``foreach=None``)."""
    return bool(group["fused"]) or (group["fused"] is None and group["foreach"] is None)


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def update_group(
    opt: Any,
    gi: int,
    fac: Factors,
    lr: float,
    weights: tuple[float, float] | None,
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor] | None,
) -> Tensor | float | None:
    """One host-scheduled step of ``opt``'s group ``gi``: the CPU kernel where it applies, else the
    multi-tensor step or the for-loop (``functional.neumann``). Returns the squared group norm
    ``||w - v||^2`` the regularizer used (Neumann phase). ``weights``: the regularizer's
    (alpha, beta) in the Neumann phase, else ``None``."""
    group = opt.param_groups[gi]
    lw, lg, lm = (opt._local(gi, ts) for ts in (params, grads, ms))
    lv = opt._local(gi, vs) if vs is not None else None  # None: the lean step
    alpha, beta = weights if weights is not None else (0.0, 0.0)
    foreach = group["foreach"]
    if foreach is None:  # the multi-tensor step, except on CPU groups that asked for the for-loop's
        foreach = group["fused"] is not False or all(p.device.type != "cpu" for p in lw)
    return F.neumann(
        lw,
        lg,
        lm,
        lv,
        phase=fac.phase,
        lr=lr,
        momentum=fac.mu,
        ema_decay=group["ema_decay"],
        weight_decay=group["weight_decay"],
        cubic_weight=alpha,
        repulsive_weight_total=beta,
        foreach=foreach,
        fused=_wants_native(group),
        reduce=None if opt._is_plain(gi) else lambda sq: all_reduce_squared_norm(sq, params),
        carry=opt._carried.setdefault(gi, {}),
    )


def device_scheduled(opt: Any, gi: int, lw: list[Tensor]) -> str | None:
    """Whether group ``gi`` steps on its device schedule (``_graph_step``): ``"compiled"`` for
    ``fused=True`` where the CPU kernel does not apply, ``"eager"`` for ``capturable=True``; ``None``:
    the host schedule. Either needs plain tensors on one device in one dtype; a momentum that a
    scheduler writes would recompile the graph, so such a group stays on the host schedule."""
    group = opt.param_groups[gi]
    if not opt._is_plain(gi) or len({(t.device, t.dtype) for t in lw}) != 1 or not lw[0].is_floating_point():
        return None
    if group["capturable"]:
        return "eager"
    # (fused=None never compiles on the user's behalf, as torch.optim never does)
    if not group["fused"] or opt._fused_failed or group["momentum_bounds"] is None or _native.usable(lw):
        return None
    return "compiled"
