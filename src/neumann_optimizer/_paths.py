"""Which path a group's step takes (the CPU kernel, the compiled graph, multi-tensor or for-loop),
and the small helpers those paths share."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from . import _native
from . import functional as F
from ._distributed import all_reduce_squared_norm
from .schedule import Phase


def compile_failed(exc: BaseException) -> bool:
    """``exc`` comes from compiling the graph (dynamo's tracing or the backend's compiler), which
    happens before the graph runs, so nothing was written; an error raised while the compiled graph
    runs (out of memory, say) is not one of these."""
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(exc, TorchDynamoException)


def _wants_native(group: dict[str, Any]) -> bool:
    """``fused=True``, or the default (``fused=None`` and ``foreach=None``)."""
    return bool(group["fused"]) or (group["fused"] is None and group["foreach"] is None)


def _native_ok(*lists: list[Tensor]) -> bool:
    """The fused path's CPU kernel applies: dense contiguous CPU tensors, all float32 or all
    float64, outside torch.compile (the kernel is an opaque ctypes call), and it compiled."""
    return not torch.compiler.is_compiling() and _native.supports(*lists) and _native.available()


def _signature(params: list[Tensor], vs: list[Tensor], lw: list[Tensor], lv: list[Tensor]) -> tuple:
    """Which tensors, where their data lies, and their version counters (bumped by every in-place
    change torch sees; not by writes through ``.data``)."""
    return (
        tuple(map(id, params)),
        tuple(map(id, vs)),
        tuple(t._version for t in lw),
        tuple(t._version for t in lv),
        tuple(t.data_ptr() for t in lw),
        tuple(t.data_ptr() for t in lv),
    )


def _coefficient(sq: float, alpha: float, beta: float) -> float:
    """:func:`functional.regularizer_coefficient` on the host: ``alpha r - beta / r^3``, or 0 where
    ``r = sqrt(sq)`` is 0 or not finite."""
    r = math.sqrt(sq) if sq >= 0 else math.nan
    if not (math.isfinite(r) and r > 0):
        return 0.0
    return alpha * r - beta / (r * r * r)


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def native_update(
    carried: dict[int, tuple[tuple, float]],
    gi: int,
    plain: bool,
    params: list[Tensor],
    vs: list[Tensor] | None,
    lw: list[Tensor],
    lg: list[Tensor],
    lm: list[Tensor],
    lv: list[Tensor] | None,
    alpha: float,
    beta: float,
    *,
    phase: Phase,
    lr: float,
    momentum: float,
    ema_decay: float,
    weight_decay: float,
) -> float | None:
    """One pass of the C kernel for param group ``gi`` (``carried``: the optimizer's record of the
    norm each group's last pass summed). The group norm a regular step needs is the one the
    previous pass summed, if no tensor changed since (same tensors, same version counters);
    otherwise it is summed afresh (one read of ``w`` and ``v``). ``vs``/``lv`` ``None``: the lean
    step (no ``v``, no norm)."""
    if lv is None:  # lean: both regularizers 0, no v and no norm
        carried.pop(gi, None)
        _native.lean_step(lw, lg, lm, phase=phase.value, lr=lr, momentum=momentum, weight_decay=weight_decay)
        return None
    assert vs is not None
    coef, sq = 0.0, None
    if phase is Phase.NEUMANN:
        last = carried.get(gi)
        if last is not None and last[0] == _signature(params, vs, lw, lv):
            sq = last[1]
        else:
            sq = _native.squared_distance(lw, lv)
        if not plain:  # local sum of the shards -> sum over ranks
            sq = float(all_reduce_squared_norm(torch.tensor(sq, dtype=torch.float64), params))
        coef = _coefficient(sq, alpha, beta)
    sq_next = _native.step(
        lw,
        lg,
        lm,
        lv,
        phase=phase.value,
        lr=lr,
        momentum=momentum,
        coef=coef,
        keep=1.0 - ema_decay,
        weight_decay=weight_decay,
    )
    carried[gi] = (_signature(params, vs, lw, lv), sq_next)
    return sq


def update_group(
    opt: Any,
    gi: int,
    phase: Phase,
    mu: float,
    lr: float,
    weights: tuple[float, float] | None,
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor] | None,
    apply: Tensor | None = None,
) -> Tensor | float | None:
    """One step of ``opt``'s group ``gi`` on the path it takes (the CPU kernel, the compiled graph,
    multi-tensor or for-loop); returns the squared group norm ``||w - v||^2``
    the regularizer used (Neumann phase; ``None`` where the path kept it on the device).
    ``weights``: the regularizer's (alpha, beta) in the Neumann phase, else ``None``.
    ``apply`` (inside torch.compile): a 0-d bool tensor, the step is written back only where true."""
    group = opt.param_groups[gi]
    plain = opt._is_plain(gi)
    lw, lg, lm = (opt._local(gi, ts) for ts in (params, grads, ms))
    lv = opt._local(gi, vs) if vs is not None else None  # None: the lean step
    alpha, beta = weights if weights is not None else (0.0, 0.0)
    kwargs = dict(
        phase=phase,
        lr=lr,
        momentum=mu,
        ema_decay=group["ema_decay"],
        weight_decay=group["weight_decay"],
    )
    if _wants_native(group) and _native_ok(lw, lg, lm, *([lv] if lv is not None else [])):
        return native_update(opt._carried, gi, plain, params, vs, lw, lg, lm, lv, alpha, beta, **kwargs)
    opt._carried.pop(gi, None)  # a step on another path: its norm was not summed
    fused = use_fused(opt, group, lw) and apply is None
    foreach = group["foreach"]
    if foreach is None:  # the multi-tensor step on accelerators, and on CPU where the kernel left the choice to it
        foreach = group["fused"] is None or all(p.device.type != "cpu" for p in lw)
    sq: Tensor | None = None
    if fused:
        try:
            coef = None  # the compiled graph reduces the norm itself ...
            if phase is Phase.NEUMANN and not plain and lv is not None:  # ... unless shards must be summed first
                sq = all_reduce_squared_norm(F.fused_squared_distance(lw, lv), params)
                coef = F.regularizer_coefficient(sq.sqrt(), alpha, beta)
            # detached aliases of the parameters (same storage): the compiled graph then
            # needs no autograd bookkeeping for inputs that require grad
            reduced = F.fused_neumann_update(
                [w.detach() for w in lw],
                lg,
                lm,
                lv,
                coef=coef,
                cubic_weight=alpha,
                repulsive_weight_total=beta,
                **kwargs,
            )
            return sq if sq is not None else reduced
        except Exception as exc:
            if not compile_failed(exc):  # it failed while running: nothing to redo, tell the caller
                raise
            fused_fallback(opt, exc)  # compilation failed before anything was written: fall back
        foreach = True
    coef, diffs = None, None
    if phase is Phase.NEUMANN and lv is not None:
        if foreach and not F.low_precision(lw):  # w - v once: the norm's differences feed the update
            local_sq, diffs = F.squared_distance_and_diffs(lw, lv, True)
        else:
            local_sq = F.squared_distance(lw, lv, foreach)
        sq = all_reduce_squared_norm(local_sq, params)
        coef = F.regularizer_coefficient(sq.sqrt(), alpha, beta)
    F.neumann_update(lw, lg, lm, lv, coef=coef, foreach=foreach, apply=apply, diffs=diffs, **kwargs)
    return sq


def fused_fallback(opt: Any, exc: Exception) -> None:
    opt._fused_failed = True
    warnings.warn(
        f"Neumann: the fused (torch.compile) path failed ({type(exc).__name__}: {exc}); "
        "falling back to the multi-tensor path",
        RuntimeWarning,
        stacklevel=6,
    )


def use_fused(opt: Any, group: dict[str, Any], lw: list[Tensor]) -> bool:
    fused = group["fused"]  # (None: never compiled on the user's behalf, as torch.optim never does)
    if not fused or opt._fused_failed:
        return False
    if len({(t.device, t.dtype) for t in lw}) != 1 or not lw[0].is_floating_point():
        if group["fused"]:
            raise RuntimeError("Neumann(fused=True) needs the parameters of a group on one device, in one dtype")
        return False
    return True


# tests set this to run the accelerators' host-read-free multi-tensor step on CPU tensors
SYNC_FREE_ON_CPU = False


def sync_free(opt: Any, gi: int, lw: list[Tensor]) -> str | None:
    """How group ``gi`` takes a step without host reads, its schedule and finite check on the device:
    ``"compiled"`` (``fused=True``: ``_graph_step.device_update`` compiles ``graph_step``) or
    ``"eager"`` (the multi-tensor step, ``_graph_step.eager_step``); ``None``: it does not. That
    needs ``nonfinite="skip"`` and plain tensors on one accelerator in one dtype. On CPU a host read
    waits for nothing, so CPU groups keep the host schedule."""
    group = opt.param_groups[gi]
    if group["nonfinite"] != "skip" or not opt._is_plain(gi) or len({(t.device, t.dtype) for t in lw}) != 1:
        return None
    if lw[0].device.type == "cpu" and not SYNC_FREE_ON_CPU:
        return None
    if _wants_native(group) and _native_ok(lw):
        return None
    if use_fused(opt, group, lw):  # the compiled graph; a momentum a scheduler writes would recompile it
        return "compiled" if group["momentum_bounds"] is not None else None
    foreach = group["foreach"]
    return "eager" if foreach or (foreach is None and lw[0].device.type != "cpu") else None
