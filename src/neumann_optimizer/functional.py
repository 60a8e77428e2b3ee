"""The Neumann update on lists of plain tensors (SPEC section 3), in two interchangeable paths.

One group's step, with ``g = grad + weight_decay * w``::

    burn-in:   w <- w - lr g
    reset:     m <- -lr g;            w <- w + mu m - lr g;  v <- w + gamma (v - w)
    neumann:   d <- g + c (w - v);    m <- mu m - lr d;      w <- w + mu m - lr d;
               v <- w + gamma (v - w)

where ``c = alpha r - beta / r^3`` (``r = ||w - v||`` over the group; eq. (8) of the paper with
the SPEC's erratum: the gradient of ``alpha/3 r^3 + beta/r`` is ``(alpha r^2 - beta/r^2) x/r``)
and ``c = 0`` when ``r`` is zero or not finite. ``v <- w + gamma (v - w)`` is computed as
``v.lerp_(w, 1 - gamma)``.

The caller (:class:`neumann_optimizer.Neumann`) decides the phase and the scalars on the host and
computes ``r`` (reducing it across ranks when parameters are sharded); the functions here only
touch tensors. ``_single_tensor_*`` loops over tensors; ``_multi_tensor_*`` uses the
``torch._foreach_*`` kernels; both apply the same operations in the same order, so they agree
to the last bit on CPU.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .schedule import Phase

__all__ = [
    "fused_neumann_update",
    "fused_squared_distance",
    "masked_update",
    "neumann_update",
    "regularizer_coefficient",
    "squared_distance",
    "squared_distance_and_diffs",
]


def regularizer_coefficient(r: Tensor, cubic_weight: float | Tensor, repulsive_weight_total: float | Tensor) -> Tensor:
    """``c = alpha r - beta / r^3`` as a 0-d tensor, or 0 where ``r`` is 0 or not finite.

    ``repulsive_weight_total`` is beta itself (``repulsive_weight * n``). No host sync.
    """
    ok = torch.isfinite(r) & (r > 0)
    safe_r = torch.where(ok, r, torch.ones_like(r))
    c = cubic_weight * safe_r - repulsive_weight_total / (safe_r * safe_r * safe_r)
    return torch.where(ok, c, torch.zeros_like(c))


LOW_PRECISION = (torch.bfloat16, torch.float16)


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
    if not params:
        return torch.zeros(())
    if any(t.dtype in LOW_PRECISION for t in params):
        parts = [
            squared_distance_and_diffs(_upcast(params[a:b]), _upcast(vs[a:b]), foreach)[0] for a, b in _chunks(params)
        ]
        return torch.stack(parts).sum()
    return squared_distance_and_diffs(params, vs, foreach)[0]


def squared_distance_and_diffs(
    params: list[Tensor], vs: list[Tensor], foreach: bool
) -> tuple[Tensor, list[Tensor] | tuple[Tensor, ...] | None]:
    """:func:`squared_distance` of tensors of one precision, and (multi-tensor path) the differences
    ``w - v`` it computed, for the update to reuse: ``w - v`` is computed once per step."""
    acc_dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    norms: list[Tensor] | tuple[Tensor, ...]
    diffs = None
    if foreach:
        diffs = torch._foreach_sub(params, vs)
        norms = torch._foreach_norm(diffs, 2.0)
    else:
        norms = [torch.linalg.vector_norm(w - v) for w, v in zip(params, vs, strict=True)]
    dev = params[0].device
    stacked = torch.stack([n.to(device=dev, dtype=acc_dtype) for n in norms])
    return (stacked * stacked).sum(), diffs


def _with_weight_decay(params: list[Tensor], grads: list[Tensor], weight_decay: float, foreach: bool) -> list[Tensor]:
    if weight_decay == 0.0:
        return grads
    if foreach:
        return list(torch._foreach_add(grads, params, alpha=weight_decay))
    return [g.add(w, alpha=weight_decay) for w, g in zip(params, grads, strict=True)]


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
) -> None:
    for i, (w, g, m) in enumerate(zip(params, grads, ms, strict=True)):
        v = vs[i] if vs is not None else None
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
        torch._foreach_copy_(ms, torch._foreach_mul(grads, -lr))
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
    apply: Tensor | None = None,
    diffs: list[Tensor] | tuple[Tensor, ...] | None = None,
) -> None:
    """Apply one step of one group in place (see the module docstring for the equations).

    ``coef`` is the regularizer coefficient (:func:`regularizer_coefficient`), needed only in
    the ``NEUMANN`` phase. All lists hold plain (local) real tensors of equal shapes.
    ``vs=None`` is the lean step of a group whose regularizers are both 0: no ``v`` to read or
    write, ``d = g`` (Nesterov momentum in the displaced form). With
    ``apply`` (a 0-d bool tensor) the step is written back only where it is true.

    bfloat16/float16 tensors are updated in float32 and rounded once at the end (as the compiled
    path does), so the result is within half an ulp of a float64 step instead of accumulating
    one rounding per operation; they are upcast a chunk of tensors at a time (``UPCAST_CHUNK``
    elements), so the float32 copies never hold the whole list. ``diffs``: the ``w - v`` the norm
    was summed from (multi-tensor path), reused in the ``NEUMANN`` phase.
    """
    kw: dict[str, Any] = dict(
        phase=phase, lr=lr, momentum=momentum, coef=coef, ema_decay=ema_decay, weight_decay=weight_decay
    )
    if low_precision(params):

        def run(w: list[Tensor], g: list[Tensor], m: list[Tensor], v: list[Tensor] | None) -> None:
            _update(w, g, m, v, foreach=foreach, apply=apply, diffs=None, **kw)

        for a, b in _chunks(params):  # burn-in leaves m and v as they are
            v = vs[a:b] if vs is not None else None
            _update_upcast(params[a:b], grads[a:b], ms[a:b], v, run, phase is not Phase.BURN_IN)
        return
    _update(params, grads, ms, vs, foreach=foreach, apply=apply, diffs=diffs, **kw)


def _update_upcast(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor] | None,
    run: Callable[..., None],
    writes_state: bool,
) -> None:
    """``run(params, grads, ms, vs)`` on float32 copies of these (low-precision) tensors, rounded
    back once (``m`` and ``v`` too where ``writes_state``)."""
    originals = (params, ms, vs if vs is not None else [])
    params, grads, ms = (_upcast(ts) for ts in (params, grads, ms))
    vs = _upcast(vs) if vs is not None else None
    run(params, grads, ms, vs)
    written = originals if writes_state else originals[:1]
    for dsts, srcs in zip(written, (params, ms, vs or []), strict=False):
        for dst, src in zip(dsts, srcs, strict=True):
            if dst is not src:
                dst.copy_(src)


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16}
_BITS[torch.bfloat16] = torch.int16


def _zero_unless(ts: list[Tensor] | tuple[Tensor, ...], ok: Tensor, *, inplace: bool) -> list[Tensor]:
    """``ts`` where ``ok`` holds, else zeros, bit for bit, inf and NaN included: the bit patterns,
    viewed as integers, times 0 or 1 (no foreach operation masks a NaN out of a float list:
    ``NaN * 0`` is NaN). One pass, no host read."""
    bits = _BITS[ts[0].dtype]
    views = [t.view(bits) for t in ts]
    flag = ok.to(bits)
    if inplace:
        torch._foreach_mul_(views, flag)
        return list(ts)
    return [t.view(ts[0].dtype) for t in torch._foreach_mul(views, flag)]


def masked_update(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor] | None,
    *,
    ok: Tensor,
    nlr: Tensor | float,
    a: Tensor,
    beta: Tensor,
    mu: Tensor,
    k: Tensor,
    coef: Tensor,
    weight_decay: float,
    burn_in: bool | None,
    diffs: list[Tensor] | tuple[Tensor, ...] | None = None,
) -> None:
    """One multi-tensor step in the branch-free form of ``_graph_step``, written back only where the
    0-d bool ``ok`` holds, with no host read: ``e = -lr d`` is zeroed bit for bit where ``ok`` is
    false, and the caller passes the factors ``a = 1``, ``mu = 0`` and ``k = 0`` there, so every
    write adds a zero or multiplies by one::

        e = nlr (g + weight_decay w + coef (w - v))      (nlr = -lr)
        m <- a m + beta e;   w <- w + mu m + e;   v <- v + k (w - v)

    ``burn_in``: ``True`` when the step is known to be in burn-in (``m`` and ``v`` are not touched,
    no ``w - v``), ``False`` when known not to be (``beta = 1``), ``None``: ``beta`` decides.
    ``vs=None``: the lean step (no ``v``). Against the host-scheduled multi-tensor step, whose
    scalars are Python numbers, masking costs a pass to zero ``e``, and ``mu m`` and ``k (w - v)``
    become temporaries (tensor factors cannot scale a foreach add): about 32 passes over the
    parameters against 23 for a regular step (15 against 11 for the lean one). Low-precision
    tensors are updated in float32 a chunk at a time, as :func:`neumann_update`.
    """
    if low_precision(params):
        kw: dict[str, Any] = dict(
            ok=ok, nlr=nlr, a=a, beta=beta, mu=mu, k=k, coef=coef, weight_decay=weight_decay, burn_in=burn_in
        )

        def run(w: list[Tensor], g: list[Tensor], m: list[Tensor], v: list[Tensor] | None) -> None:
            masked_update(w, g, m, v, **kw)  # (float32 copies)

        for lo, hi in _chunks(params):
            v = vs[lo:hi] if vs is not None else None
            _update_upcast(params[lo:hi], grads[lo:hi], ms[lo:hi], v, run, burn_in is not True)
        return
    if not params:
        return
    if vs is None:
        if weight_decay != 0.0:
            e = _zero_unless(torch._foreach_add(grads, params, alpha=weight_decay), ok, inplace=True)
        else:
            e = _zero_unless(grads, ok, inplace=False)  # a zeroed copy: the gradients stay as they are
    else:
        e = list(diffs) if diffs is not None else list(torch._foreach_sub(params, vs))
        torch._foreach_mul_(e, coef)
        torch._foreach_add_(e, grads)
        if weight_decay != 0.0:
            torch._foreach_add_(e, params, alpha=weight_decay)
        _zero_unless(e, ok, inplace=True)
    # e holds d, zeroed where skipped: a Python lr scales it inside the adds, a tensor lr once here
    alpha = nlr if not isinstance(nlr, Tensor) else 1.0
    if isinstance(nlr, Tensor):
        torch._foreach_mul_(e, nlr)
    if burn_in is not True:
        torch._foreach_mul_(ms, a)
        torch._foreach_add_(ms, e if burn_in is False else torch._foreach_mul(e, beta), alpha=alpha)
        torch._foreach_add_(params, torch._foreach_mul(ms, mu))
    torch._foreach_add_(params, e, alpha=alpha)
    if vs is not None and burn_in is not True:
        dv = torch._foreach_sub(params, vs)
        torch._foreach_mul_(dv, k)
        torch._foreach_add_(vs, dv)


def _update(
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
    apply: Tensor | None,
    diffs: list[Tensor] | tuple[Tensor, ...] | None,
) -> None:
    grads = _with_weight_decay(params, grads, weight_decay, foreach)
    kw: dict[str, Any] = dict(phase=phase, lr=lr, momentum=momentum, coef=coef, ema_decay=ema_decay)
    if apply is not None:  # the compiled path's functional form, written back where ``apply`` holds
        c = coef if coef is not None else 0.0
        _fused_body(
            params, grads, ms, vs, lr, momentum, c, 1.0 - ema_decay, 0.0, 0.0, 0.0, phase.value, False, False, apply
        )
    elif foreach:
        _multi_tensor_neumann(params, grads, ms, vs, diffs=diffs, **kw)
    else:
        _single_tensor_neumann(params, grads, ms, vs, **kw)


# ---------------------------------------------------------------------------------------------
# Fused path: one torch.compile'd graph per step: the group's sum ||w - v||^2 (one read of w and
# v), the regularizer coefficient, and the update (each of w, m, v read and written once, g read
# once). No temporaries the size of a parameter, no host synchronisation.
#
# A first design reduced the next step's ||w - v|| inside this step's update pass
# instead. Inductor's CPU code for a reduction over a buffer the same kernel mutates stages that
# buffer (a temporary the size of v plus a copy back); fresh temporaries cost page faults on
# every step, and that kernel ran 2-3x slower than the update plus a reduction of its own
# (docs/PERFORMANCE.md). Reducing first, from the inputs, needs no staging and no cache. On CPU
# the optimizer uses its C kernel instead (_native.c), which does sum the next step's norm in the
# update pass; this graph serves CUDA, other dtypes, and CPUs where the kernel does not compile.
# ---------------------------------------------------------------------------------------------
def _fused_body(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor] | None,
    lr: Tensor | float,
    mu: Tensor | float,
    coef: Tensor | float,
    keep: Tensor | float,
    weight_decay: Tensor | float,
    alpha: Tensor | float,
    beta: Tensor | float,
    phase: str,
    use_weight_decay: bool,
    reduce_norm: bool,
    apply: Tensor | None = None,
) -> Tensor | None:
    """The SPEC's update for every tensor, written once; ``phase`` and the flags are static.

    With ``reduce_norm`` (Neumann phase, unsharded parameters) the coefficient is computed here
    from ``alpha``, ``beta`` and the group norm, which is returned; otherwise ``coef`` is used as
    given and nothing is returned. ``vs=None``: the lean step (no ``v``, ``d = g``). With ``apply``
    (a 0-d bool tensor) each new value is written back only where it is true: a step skipped
    without a host synchronisation (inside ``torch.compile``, where inductor fuses each tensor's
    expressions into one pass).
    """

    def put(dst: Tensor, new: Tensor) -> None:
        dst.copy_(new if apply is None else torch.where(apply, new, dst))

    sq = None
    if phase == "neumann" and reduce_norm and vs is not None:
        sq = _sq_body(params, vs)
        coef = regularizer_coefficient(sq.sqrt(), alpha, beta).to(sq.dtype)
    for i, (w, g, m) in enumerate(zip(params, grads, ms, strict=True)):
        v = vs[i] if vs is not None else None
        if use_weight_decay:
            g = g + weight_decay * w
        if phase == "burn_in":
            put(w, w - lr * g)
            continue
        if phase == "reset":
            d = g
            m_new = -lr * d
        else:
            d = g if v is None else g + coef * (w - v)
            m_new = mu * m - lr * d
        w_new = w + mu * m_new - lr * d
        put(m, m_new)
        put(w, w_new)
        if v is not None:
            put(v, v + keep * (w_new - v))  # lerp(v, w_new, 1 - gamma) = w_new + gamma (v - w_new)
    return sq


def _sq_body(params: list[Tensor], vs: list[Tensor]) -> Tensor:
    """``sum ||w - v||^2``, accumulated in float64 for float64 parameters, float32 otherwise."""
    acc = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    sq = torch.zeros((), dtype=acc, device=params[0].device)
    for w, v in zip(params, vs, strict=True):
        diff = (w - v).to(acc).reshape(-1)
        n = diff.numel()
        k = n - n % _CHUNK
        if k:  # rows of _CHUNK: inductor's plain vectorised sum, no cascade-summation helper
            rows = diff[:k].view(-1, _CHUNK)
            sq = sq + (rows * rows).sum(1).sum()
        if k < n:
            tail = diff[k:]
            sq = sq + (tail * tail).sum()
    return sq


_CHUNK = 4096


_COMPILED: dict[tuple, object] = {}
# per-call checks of ~4 inputs per parameter cost more than the kernel on small models
_COMPILE_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {"size_asserts": False}


def _compiled(key: tuple, body: Callable[..., Any] | None = None) -> object:
    """A compiled copy of a body (``_fused_body`` for ``"step"`` keys, else ``_sq_body``, unless
    given), one per ``key``.

    Dynamo caches compiled graphs per code object and caps them (``recompile_limit``, 8); each
    phase, tensor count and dtype of a group is a graph of its own, so every key gets its own
    copy of the code object and so its own cache.
    """
    fn = _COMPILED.get(key)
    if fn is None:
        if body is None:
            body = _fused_body if key[0] == "step" else _sq_body
        tag = "_".join(str(k).replace(".", "_") for k in key)
        code = body.__code__.replace(co_name=f"{body.__name__}_{tag}")
        copy = types.FunctionType(code, body.__globals__, code.co_name, body.__defaults__, body.__closure__)
        fn = torch.compile(copy, fullgraph=True, dynamic=False, options=_COMPILE_OPTIONS)
        _COMPILED[key] = fn
    return fn


def _key(kind: str, params: list[Tensor], *extra: object) -> tuple:
    """A graph's cache key: with ``dynamic=False`` every shape is baked into the graph, so groups of
    equal tensor counts but other shapes get code objects of their own (one shared code object would
    recompile per group and reach dynamo's recompile limit)."""
    shapes = tuple(tuple(t.shape) for t in params)
    return (kind, len(params), params[0].dtype, params[0].device.type, hash(shapes), *extra)


def fused_squared_distance(params: list[Tensor], vs: list[Tensor]) -> Tensor:
    """:func:`squared_distance` as one compiled reduction (a 0-d tensor, no host sync)."""
    return _compiled(_key("sq", params))(params, vs)  # type: ignore[operator]


def fused_neumann_update(
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
    cubic_weight: float = 0.0,
    repulsive_weight_total: float = 0.0,
) -> Tensor | None:
    """The update of :func:`neumann_update` as one ``torch.compile``d graph; returns the group's
    ``sum ||w - v||^2`` when it reduced it itself (``coef=None`` in the ``NEUMANN`` phase).

    In the ``NEUMANN`` phase, ``coef=None`` makes the graph reduce the group norm itself (from
    ``cubic_weight`` and ``repulsive_weight_total``, as :func:`regularizer_coefficient`); pass
    ``coef`` when the norm needs a reduction across ranks first. Scalars travel as 0-d tensors,
    so a changing learning rate does not recompile. Raises whatever compilation raises; the
    optimizer then falls back to the multi-tensor path.
    """
    reduce_norm = phase is Phase.NEUMANN and coef is None and vs is not None
    fn = _compiled(_key("step", params, phase.value, weight_decay != 0.0, reduce_norm, vs is None))
    dev = params[0].device
    dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32

    def scalar(x: float) -> Tensor:  # a fill on the device (the value a kernel argument), not a host copy
        return torch.full((), x, dtype=dtype, device=dev)

    c = coef.to(device=dev, dtype=dtype) if coef is not None else scalar(0.0)
    return fn(  # type: ignore[operator]
        params,
        grads,
        ms,
        vs,
        scalar(lr),
        scalar(momentum),
        c,
        scalar(1.0 - ema_decay),
        scalar(weight_decay),
        scalar(cubic_weight),
        scalar(repulsive_weight_total),
        phase.value,
        weight_decay != 0.0,
        reduce_norm,
    )
