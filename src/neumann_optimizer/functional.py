"""The Neumann update on lists of plain tensors (SPEC section 3); :func:`neumann` is the entry.

One group's step, with ``g = grad + weight_decay * w``::

    burn-in:   w <- w - lr g
    reset:     m <- -lr g;            w <- w + mu m - lr g;  v <- w + gamma (v - w)
    neumann:   d <- g + c (w - v);    m <- mu m - lr d;      w <- w + mu m - lr d;
               v <- w + gamma (v - w)

where ``c = alpha r - beta / r^3`` (``r = ||w - v||`` over the group; eq. (8) of the paper with
the SPEC's erratum: the gradient of ``alpha/3 r^3 + beta/r`` is ``(alpha r^2 - beta/r^2) x/r``)
and ``c = 0`` when ``r`` is zero or not finite. The bodies: the C kernel (``_native``), the
multi-tensor step (``torch._foreach_*``) and the for-loop (the same operations in the same order:
they agree to the last bit on CPU), and the device-scheduled graph (``_graph_step.graph_step``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .schedule import Phase

__all__ = [
    "neumann",
    "neumann_update",
    "regularizer_coefficient",
    "squared_distance",
    "squared_distance_and_diffs",
]


def regularizer_coefficient(r: Any, cubic_weight: Any, repulsive_weight_total: Any) -> Any:
    """``c = alpha r - beta / r^3`` (beta: ``repulsive_weight_total = repulsive_weight * n``), or 0 where
    ``r`` is 0 or not finite: a 0-d tensor for a tensor ``r`` (no host sync), a float for a float."""
    if not isinstance(r, Tensor):
        ok_ = math.isfinite(r) and r > 0
        return cubic_weight * r - repulsive_weight_total / (r * r * r) if ok_ else 0.0
    ok = torch.isfinite(r) & (r > 0)
    safe_r = torch.where(ok, r, torch.ones_like(r))
    c = cubic_weight * safe_r - repulsive_weight_total / (safe_r * safe_r * safe_r)
    return torch.where(ok, c, torch.zeros_like(c))


LOW_PRECISION = (torch.bfloat16, torch.float16)
# the last chunk's differences w - v, kept from the norm for the update: (start index, diffs)
Kept = tuple[int, "list[Tensor] | tuple[Tensor, ...]"] | None


def low_precision(ts: list[Tensor]) -> bool:
    """Some of ``ts`` are bfloat16 or float16 (updated in float32, a chunk at a time)."""
    return any(t.dtype in LOW_PRECISION for t in ts)


def _need(coef: Tensor | None) -> Tensor:
    if coef is None:
        raise ValueError("neumann_update: the regularized (NEUMANN) phase needs coef when vs is given")
    return coef


def _upcast(ts: list[Tensor]) -> list[Tensor]:
    """bfloat16/float16 tensors as float32 copies (others as they are)."""
    return [t.float() if t.dtype in LOW_PRECISION else t for t in ts]


# low-precision tensors are upcast this many elements at a time: float32 temporaries of a bounded
# size, not of the whole parameter list
UPCAST_CHUNK = 2**24


def _chunks(ts: list[Tensor], size: int | None = None) -> list[tuple[int, int]]:
    """Consecutive index ranges of ``ts`` of at most ``size`` (``UPCAST_CHUNK``) elements each (a
    larger tensor alone)."""
    size = UPCAST_CHUNK if size is None else size
    out, lo, total = [], 0, 0
    for i, t in enumerate(ts):
        if i > lo and total + t.numel() > size:
            out.append((lo, i))
            lo, total = i, 0
        total += t.numel()
    if lo < len(ts):
        out.append((lo, len(ts)))
    return out


def squared_distance(params: list[Tensor], vs: list[Tensor], foreach: bool) -> Tensor:
    """``sum_i ||w_i - v_i||^2`` as a float32 (float64 for float64 params) 0-d tensor.

    bfloat16/float16 differences and norms are computed in float32 (a low-precision norm,
    rounded before it is squared and summed, is off by several ulp, and ``beta / r^3`` triples
    that error), a chunk of tensors at a time."""
    return squared_distance_and_diffs(params, vs, foreach)[0]


def squared_distance_and_diffs(
    params: list[Tensor], vs: list[Tensor], foreach: bool, spans: list[tuple[int, int]] | None = None
) -> tuple[Tensor, Kept]:
    """:func:`squared_distance`, summed a chunk of tensors at a time (``_chunks``), and (multi-tensor
    path, one precision) the differences ``w - v`` of the last chunk, for the update to reuse:
    ``(start, diffs)`` of ``params[start:]``, else ``None``. No temporary outlives its chunk but
    that one, so a group of at most ``UPCAST_CHUNK`` elements computes ``w - v`` once per step and
    a larger one recomputes it for all chunks but the last. ``spans``: ``_chunks(params)``, where the
    caller has it."""
    if not params:
        return torch.zeros(()), None
    low = low_precision(params)
    acc_dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    parts, kept = [], None
    for a, b in _chunks(params) if spans is None else spans:
        lw, lv = (_upcast(params[a:b]), _upcast(vs[a:b])) if low else (params[a:b], vs[a:b])
        norms: list[Tensor] | tuple[Tensor, ...]
        if foreach:
            diffs = torch._foreach_sub(lw, lv)
            norms = torch._foreach_norm(diffs, 2.0)
            kept = None if low else (a, diffs)
        else:
            norms = [torch.linalg.vector_norm(w - v) for w, v in zip(lw, lv, strict=True)]
        parts.append(torch.stack([n.to(device=lw[0].device, dtype=acc_dtype) for n in norms]))
    stacked = parts[0] if len(parts) == 1 else torch.cat(parts)
    return (stacked * stacked).sum(), kept


def _with_weight_decay(params: list[Tensor], grads: list[Tensor], weight_decay: float) -> list[Tensor]:
    """``g + wd w`` of a chunk (multi-tensor; the for-loop adds it a tensor at a time)."""
    return grads if weight_decay == 0.0 else list(torch._foreach_add(grads, params, alpha=weight_decay))


def _single_tensor_neumann(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor] | None,
    *,
    phase: Phase,
    lr: float,
    momentum: float,
    coef: Tensor | None,
    ema_decay: float,
    weight_decay: float = 0.0,
) -> None:
    for i, (w, g, m) in enumerate(zip(params, grads, ms, strict=True)):
        v = vs[i] if vs is not None else None
        g = g.add(w, alpha=weight_decay) if weight_decay != 0.0 else g
        if phase is Phase.BURN_IN:
            w.add_(g, alpha=-lr)
            continue
        if phase is Phase.RESET:
            d = g
            torch.mul(g, -lr, out=m)
        else:
            d = g if v is None else torch.sub(w, v).mul_(_need(coef)).add_(g)
            m.mul_(momentum).add_(d, alpha=-lr)
        w.add_(m, alpha=momentum).add_(d, alpha=-lr)
        if v is not None:
            v.lerp_(w, 1.0 - ema_decay)


def _multi_tensor_neumann(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor] | None,
    *,
    phase: Phase,
    lr: float,
    momentum: float,
    coef: Tensor | None,
    ema_decay: float,
    diffs: list[Tensor] | tuple[Tensor, ...] | None = None,
) -> None:
    if not params:
        return
    if phase is Phase.BURN_IN:
        torch._foreach_add_(params, grads, alpha=-lr)
        return
    ds: list[Tensor] | tuple[Tensor, ...]
    if phase is Phase.RESET:
        ds = grads
        torch._foreach_copy_(ms, grads)  # m <- -lr g in place: the same bits as mul(g, -lr, out=m)
        torch._foreach_mul_(ms, -lr)
    else:
        if vs is None:  # lean: no regularizer, d = g
            ds = grads
        else:  # w - v: the differences the norm was summed from, where the caller kept them
            ds = diffs if diffs is not None else torch._foreach_sub(params, vs)
            torch._foreach_mul_(ds, _need(coef))
            torch._foreach_add_(ds, grads)
        torch._foreach_mul_(ms, momentum)
        torch._foreach_add_(ms, ds, alpha=-lr)
    torch._foreach_add_(params, ms, alpha=momentum)
    torch._foreach_add_(params, ds, alpha=-lr)
    if vs is not None:
        torch._foreach_lerp_(vs, params, 1.0 - ema_decay)


def neumann_update(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor] | None,
    *,
    phase: Phase,
    lr: float,
    momentum: float,
    coef: Tensor | None,
    ema_decay: float,
    weight_decay: float,
    foreach: bool,
    diffs: Kept = None,
    spans: list[tuple[int, int]] | None = None,
) -> None:
    """Apply one step of one group in place (see the module docstring for the equations).

    ``coef`` is the regularizer coefficient (:func:`regularizer_coefficient`), needed only in
    the ``NEUMANN`` phase. All lists hold plain (local) real tensors of equal shapes.
    ``vs=None`` is the lean step of a group whose regularizers are both 0: no ``v`` to read or
    write, ``d = g`` (Nesterov momentum in the displaced form).

    The multi-tensor step runs a chunk of tensors at a time (``UPCAST_CHUNK`` elements, a larger
    tensor alone), so no temporary (``w - v``, ``g + wd w``, a float32 copy) holds more than a
    chunk. bfloat16/float16 tensors are updated in float32 and rounded once at the end (as the
    compiled path does), so the result is within half an ulp of a float64 step instead of
    accumulating one rounding per operation. ``diffs``: the last chunk's ``w - v`` the norm was
    summed from (:func:`squared_distance_and_diffs`), reused in the ``NEUMANN`` phase; ``spans``: the
    chunks it was summed over (``_chunks(params)``). (:func:`neumann` is the entry that picks the
    body and computes ``coef``.)
    """
    kw: dict[str, Any] = dict(phase=phase, lr=lr, momentum=momentum, coef=coef, ema_decay=ema_decay)
    if not foreach and not low_precision(params):  # the for-loop: temporaries of one tensor
        _single_tensor_neumann(params, grads, ms, vs, weight_decay=weight_decay, **kw)
        return
    for a, b in _chunks(params) if spans is None else spans:
        v = vs[a:b] if vs is not None else None
        if not low_precision(params[a:b]):
            chunk_diffs = diffs[1] if diffs is not None and diffs[0] == a else None
            gs = _with_weight_decay(params[a:b], grads[a:b], weight_decay)
            _multi_tensor_neumann(params[a:b], gs, ms[a:b], v, diffs=chunk_diffs, **kw)
            continue
        # float32 copies of a chunk, rounded back once (burn-in: w alone)
        up = [_upcast(ts) for ts in (params[a:b], grads[a:b], ms[a:b], v or [])]
        uv = up[3] if v is not None else None
        if foreach:
            _multi_tensor_neumann(up[0], _with_weight_decay(up[0], up[1], weight_decay), up[2], uv, **kw)
        else:
            _single_tensor_neumann(up[0], up[1], up[2], uv, weight_decay=weight_decay, **kw)
        written = (params[a:b], ms[a:b], v or []) if phase is not Phase.BURN_IN else (params[a:b],)
        for dsts, srcs in zip(written, (up[0], up[2], up[3]), strict=False):
            for dst, src in zip(dsts, srcs, strict=True):
                if dst is not src:
                    dst.copy_(src)


# ---------------------------------------------------------------------------------------------
# The entry: picks the body (the C kernel, the multi-tensor step or the for-loop) as
# torch.optim.sgd.sgd() does, computes the group norm and the regularizer's coefficient.
# ---------------------------------------------------------------------------------------------
def neumann(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor] | None,
    *,
    phase: Phase | None = None,
    lr: float = 0.0,
    momentum: float = 0.0,
    ema_decay: float = 0.0,
    weight_decay: float = 0.0,
    cubic_weight: float = 0.0,
    repulsive_weight_total: float = 0.0,
    foreach: bool | None = None,
    fused: bool | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    carry: dict[str, Any] | None = None,
    schedule: dict[str, Tensor] | None = None,
    constants: dict[str, Any] | None = None,
    compile_key: tuple | None = None,
) -> Tensor | float | None:
    """One step of one group, in place: the functional form of :class:`~neumann_optimizer.Neumann`'s
    step, and the only update its ``step()`` calls. Returns the group's ``||w - v||^2`` the
    regularizer used (``NEUMANN`` phase with ``vs``), else ``None`` (a NaN tensor on the device
    schedule).

    Host schedule: ``phase``, ``lr`` and ``momentum`` decided by the caller
    (:func:`neumann_optimizer.schedule.factors`). ``fused`` ``None`` or ``True`` takes the CPU kernel
    (``_native.c``) where it applies (dense CPU float32/float64 tensors of matching strides, the
    kernel compiled); otherwise ``foreach`` (``None``: ``True``) takes the multi-tensor step,
    ``False`` the for-loop. ``cubic_weight`` and ``repulsive_weight_total`` are alpha and beta
    (``repulsive_weight * n``). ``reduce`` sums a local ``||w - v||^2`` over ranks (sharded
    parameters). ``carry``: a dict the caller keeps per group for the kernel, which sums the next
    step's norm in its pass; used while the tensors are the same and unchanged (version counters).

    Device schedule (``torch.compile(opt.step)``, ``fused=True`` off the kernel, ``capturable=True``):
    ``schedule`` holds the group's counters as 0-d tensors, which the step reads and advances, and
    ``constants`` the group's hyperparameters (``lr`` a 0-d tensor, ``n``, ``check``: the finite
    check); :func:`neumann_optimizer._graph_step.graph_step` runs, compiled once per
    ``compile_key`` where one is given (``fused=True``), else eagerly or traced."""
    from . import _native

    if schedule is not None:
        from ._graph_step import _compiled, graph_step

        assert constants is not None, "the device schedule needs the group's constants"
        step = _compiled(compile_key) if compile_key is not None else graph_step
        step(constants, schedule, params, grads, ms, vs)
        return schedule["sq"]
    if phase is None:
        raise TypeError("neumann(): give the step's phase (host schedule) or a device schedule")

    vs_ = vs if vs is not None else []
    if fused is not False and _native.usable(params, grads, ms, *([vs] if vs is not None else [])):
        hp = (phase, lr, momentum, ema_decay, weight_decay, cubic_weight, repulsive_weight_total, reduce)
        return _native_neumann(params, grads, ms, vs, hp, carry if carry is not None else {})
    if carry is not None:
        carry.clear()  # a step on another body: its norm was not summed
    foreach = True if foreach is None else foreach
    coef = diffs = sq = None
    spans = _chunks(params)  # one chunking for the norm and the update: the kept w - v matches its chunk
    if phase is Phase.NEUMANN and vs is not None:
        sq, diffs = squared_distance_and_diffs(params, vs_, foreach, spans)  # (the last chunk's w - v feeds the update)
        sq = reduce(sq) if reduce is not None else sq
        coef = regularizer_coefficient(sq.sqrt(), cubic_weight, repulsive_weight_total)
    neumann_update(
        params,
        grads,
        ms,
        vs,
        phase=phase,
        lr=lr,
        momentum=momentum,
        coef=coef,
        ema_decay=ema_decay,
        weight_decay=weight_decay,
        foreach=foreach,
        diffs=diffs,
        spans=spans,
    )
    return sq


def _signature(lw: list[Tensor], lv: list[Tensor]) -> tuple:
    """Which tensors, where their data lies, and their version counters (bumped by every in-place
    change torch sees; not by writes through ``.data``)."""
    return (
        tuple(map(id, lw)),
        tuple(map(id, lv)),
        tuple(t._version for t in lw),
        tuple(t._version for t in lv),
        tuple(t.data_ptr() for t in lw),
        tuple(t.data_ptr() for t in lv),
    )


def _native_neumann(
    lw: list[Tensor], lg: list[Tensor], lm: list[Tensor], lv: list[Tensor] | None, hp: tuple, carry: dict[str, Any]
) -> float | None:
    """One pass of the C kernel. The group norm a regular step needs is the one the previous pass
    summed (``carry``) if no tensor changed since; otherwise it is summed afresh (one read of ``w``
    and ``v``). ``lv`` ``None``: the lean step (no ``v``, no norm)."""
    from . import _native

    phase, lr, momentum, ema_decay, weight_decay, alpha, beta, reduce = hp
    coef, sq = 0.0, None
    if phase is Phase.NEUMANN and lv is not None:
        sq = carry["sq"] if carry.get("signature") == _signature(lw, lv) else _native.squared_distance(lw, lv)
        if reduce is not None:  # local sum of the shards -> sum over ranks
            sq = float(reduce(torch.tensor(sq, dtype=torch.float64)))
        coef = regularizer_coefficient(math.sqrt(sq) if sq >= 0 else math.nan, alpha, beta)
    kw = dict(phase=phase.value, lr=lr, momentum=momentum, coef=coef, keep=1.0 - ema_decay, weight_decay=weight_decay)
    sq_next = _native.step(lw, lg, lm, lv, **kw)
    if lv is None:
        carry.clear()
    else:
        carry.update(signature=_signature(lw, lv), sq=sq_next)
    return sq
