"""The Neumann optimizer as an optax transformation (the project's SPEC section 3).

One step of the transformation, with ``s`` the applied steps so far plus one, ``B`` =
``burn_in_steps``, ``t = s - B`` and ``g`` the gradient (plus ``weight_decay * w``)::

    s <= B (burn-in, plain SGD):  w <- w - lr g                 (v = w_0 and m = 0 are kept)
    t is a reset step:            m <- -lr g
                                  w <- w + mu_t m - lr g;  v <- w + gamma (v - w)
    otherwise:                    x = w - v,  r = ||x|| over the whole parameter tree
                                  d = g + (alpha r^2 - beta / r^2) x / r      (d = g if r == 0)
                                  m <- mu_t m - lr d
                                  w <- w + mu_t m - lr d;  v <- w + gamma (v - w)

``mu_t = clip(1 - 1/(1 + t/tau), mu_min, mu_max)``; resets at ``t = 1, 1+K_0, 1+K_0+K_1, ...`` with
``K_{j+1} = max(1, floor(reset_growth * K_j))``; ``beta = repulsive_weight * n`` with ``n`` the
number of scalars in the tree. Every branch is a ``jnp.where`` on the step count held in the
state, so one ``jax.jit`` compilation serves burn-in, resets and the regularized steps.
"""

# No ``from __future__ import annotations``: ``learning_rate`` is annotated with the object
# ``optax.ScalarOrSchedule`` itself, which is how optax's generic contrib suite (and its users'
# tooling) recognise that an optimizer accepts a schedule.
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["NeumannState", "evaluation_params", "neumann"]


class NeumannState(NamedTuple):
    """Arrays only: the applied-step count ``s``, the reset schedule, the last momentum (for the
    evaluation weights), the learning rate at step 0 (for ``regularizer_schedule``), ``m`` and ``v``."""

    count: jax.Array  # type: ignore[assignment]  # int32: steps applied so far (as optax's own states)
    next_reset: jax.Array  # int32: Neumann-phase step t of the next iterate reset
    reset_interval: jax.Array  # int32: K_j
    last_momentum: jax.Array  # mu of the last step (0 during burn-in)
    reference_lr: jax.Array  # the learning rate of the first step
    m: optax.Params  # the Neumann iterate
    v: optax.Params | None  # the moving average of the weights; None in the lean form (both weights 0)


def _is_concrete(x: Any) -> bool:
    """A plain Python number (arrays and tracers, e.g. from ``optax.inject_hyperparams``, are
    not validated: their values are not known when the transformation is built)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or (_is_concrete(value) and (not isinstance(value, int) or value < minimum)):
        raise ValueError(f"neumann_optax: {name} must be an int >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False) -> None:
    if isinstance(value, bool):
        raise ValueError(f"neumann_optax: {name} must be a number, got {value!r}")
    if not _is_concrete(value):
        return
    ok = math.isfinite(value) and (value > low if open_low else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high != math.inf else "")
        raise ValueError(f"neumann_optax: {name} must be a finite number {bound}, got {value!r}")


def _resolve(name: str, given: Any, epochs: int, steps_per_epoch: Any) -> Any:
    if given is not None:
        return given
    if steps_per_epoch is None:
        raise ValueError(
            f"neumann_optax: {name} is not given and neither is steps_per_epoch; pass "
            f"steps_per_epoch=<batches per epoch> to use the paper's default "
            f"({epochs} epoch{'s' if epochs != 1 else ''}), or give {name} in steps"
        )
    return epochs * steps_per_epoch


def _check_learning_rate(lr: Any) -> None:
    """A number, a one-element array or a schedule (a callable); a number or a concrete array must
    be finite and >= 0. Tracers (``optax.inject_hyperparams`` under ``jax.jit``) pass unchecked."""
    if callable(lr) or isinstance(lr, jax.core.Tracer):
        return
    value = lr
    array = isinstance(lr, (jax.Array, np.ndarray, np.generic)) and np.size(lr) == 1
    if array and (jnp.issubdtype(lr.dtype, jnp.floating) or jnp.issubdtype(lr.dtype, jnp.integer)):
        value = float(np.asarray(lr).reshape(()))  # a one-element real array: checked as its number
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok:
        # the PyTorch class's message, with this front end's name for the argument
        raise ValueError(f"neumann_optax: learning_rate must be a finite number >= 0.0, got {lr!r}")


def _validate(kw: dict[str, Any]) -> None:
    _check_learning_rate(kw["learning_rate"])
    _check_int("burn_in_steps", kw["burn_in_steps"], 0)
    _check_int("reset_steps", kw["reset_steps"], 1)
    _check_float("reset_growth", kw["reset_growth"], 0.0, open_low=True)
    _check_float("momentum_ramp_steps", kw["momentum_ramp_steps"], 0.0, open_low=True)
    mom = kw["momentum"]
    if isinstance(mom, (tuple, list)):
        if len(mom) != 2:
            raise ValueError(f"neumann_optax: momentum must be a pair (mu_min, mu_max) or a number, got {mom!r}")
        _check_float("momentum[0] (mu_min)", mom[0], 0.0, 1.0)
        _check_float("momentum[1] (mu_max)", mom[1], 0.0, 1.0)
        if _is_concrete(mom[0]) and _is_concrete(mom[1]) and mom[0] > mom[1]:
            raise ValueError(f"neumann_optax: momentum must satisfy mu_min <= mu_max, got {tuple(mom)!r}")
    else:
        _check_float("momentum", mom, 0.0, 1.0)
    _check_float("cubic_weight", kw["cubic_weight"], 0.0)
    _check_float("repulsive_weight", kw["repulsive_weight"], 0.0)
    _check_float("ema_decay", kw["ema_decay"], 0.0, 1.0)
    _check_float("weight_decay", kw["weight_decay"], 0.0)
    sched = kw["regularizer_schedule"]
    if isinstance(sched, str):
        if sched not in ("constant", "lr"):
            raise ValueError(
                "neumann_optax: regularizer_schedule must be 'constant', 'lr' or a power p >= 0 "
                f"(alpha, beta scaled by (lr / initial lr) ** p), got {sched!r}"
            )
    else:
        _check_float("regularizer_schedule", sched, 0.0)


def neumann(
    learning_rate: optax.ScalarOrSchedule,
    *,
    steps_per_epoch: int | None = None,
    burn_in_steps: int | None = None,
    reset_steps: int | None = None,
    reset_growth: float = 2.0,
    momentum: tuple[float, float] | float = (0.5, 0.9),
    momentum_ramp_steps: float | None = None,
    cubic_weight: float = 1e-7,
    repulsive_weight: float = 0.0,
    ema_decay: float = 0.99,
    weight_decay: float = 0.0,
    regularizer_schedule: str | float = "constant",
) -> optax.GradientTransformationExtraArgs:
    """The Neumann optimizer (Krishnan, Xiao & Saurous, 2017, Algorithm 2), as in the PyTorch class
    ``neumann_optimizer.Neumann`` (same arguments, defaults and trajectories).

    Args:
        learning_rate: ``eta``, a number or an optax schedule of the applied-step count.
        steps_per_epoch: gives the paper's epoch-denominated defaults (burn-in 5 epochs, first
            reset interval 10 epochs, momentum ramp 1 epoch).
        burn_in_steps: ``B``, steps of plain SGD before the Neumann phase.
        reset_steps: ``K_0``, Neumann-phase steps between the first two iterate resets.
        reset_growth: factor by which the reset interval grows after every reset.
        momentum: ``(mu_min, mu_max)`` for the paper's ramp, or one number: a constant ``mu``.
        momentum_ramp_steps: ``tau`` of the ramp.
        cubic_weight: ``alpha`` of the cubic regularizer ``alpha/3 ||w - v||^3``; the paper's 1e-7, kept
            as the PyTorch class keeps it (the project's sweep found no better strength).
        repulsive_weight: ``beta / n`` of the repulsive term ``beta / ||w - v||``; 0 by default, as
            in the PyTorch class (the paper's Table 1 has 1e-5: pass it for the paper exactly).
        ema_decay: ``gamma``, decay of the moving average ``v``.
        weight_decay: coupled L2 added to the gradient (as ``torch.optim.SGD``); for decoupled
            decay chain ``optax.add_decayed_weights`` after this transformation.
        regularizer_schedule: ``"constant"`` (the paper), ``"lr"`` or a power ``p``: ``alpha`` and
            ``beta`` scaled by ``(lr / lr_0) ** p``, ``lr_0`` the rate of the first step.

    The norm ``||w - v||`` and ``n`` cover the whole parameter tree (the paper's one vector); for
    per-subtree norms (PyTorch's parameter groups) wrap it in ``optax.partition``. The
    transformation does not check for inf/NaN: wrap it in ``optax.apply_if_finite`` to skip such
    steps (PyTorch's ``nonfinite="skip"``). Evaluate and export :func:`evaluation_params`.

    With ``cubic_weight`` and ``repulsive_weight`` both given as the number 0, the state holds no
    ``v`` (``state.v is None``) and no norm is computed: the lean form, as the PyTorch class's lean
    step. The state's shapes are fixed when the transformation is built; hyperparameters injected
    as arrays (``optax.inject_hyperparams``) keep ``v``.
    """
    kw = dict(
        learning_rate=learning_rate,
        burn_in_steps=_resolve("burn_in_steps", burn_in_steps, 5, steps_per_epoch),
        reset_steps=_resolve("reset_steps", reset_steps, 10, steps_per_epoch),
        reset_growth=reset_growth,
        momentum=momentum,
        momentum_ramp_steps=_resolve("momentum_ramp_steps", momentum_ramp_steps, 1, steps_per_epoch),
        cubic_weight=cubic_weight,
        repulsive_weight=repulsive_weight,
        ema_decay=ema_decay,
        weight_decay=weight_decay,
        regularizer_schedule=regularizer_schedule,
    )
    if steps_per_epoch is not None:
        _check_int("steps_per_epoch", steps_per_epoch, 1)
    _validate(kw)

    def lr_at(count: jax.Array) -> jax.Array:
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        return jnp.asarray(lr, dtype=_float())

    lean = all(_is_concrete(kw[k]) and kw[k] == 0 for k in ("cubic_weight", "repulsive_weight"))

    def init_fn(params: optax.Params) -> NeumannState:
        leaves = jax.tree.leaves(params)
        if any(jnp.iscomplexobj(x) for x in leaves):
            raise ValueError("neumann_optax does not support complex parameters")
        return NeumannState(
            count=jnp.zeros([], jnp.int32),
            next_reset=jnp.ones([], jnp.int32),
            reset_interval=jnp.asarray(kw["reset_steps"], jnp.int32),
            last_momentum=jnp.zeros([], _float()),
            reference_lr=lr_at(jnp.zeros([], jnp.int32)),
            m=jax.tree.map(jnp.zeros_like, params),
            v=None if lean else jax.tree.map(lambda p: jnp.array(p, copy=True), params),
        )

    def update_fn(
        updates: optax.Updates, state: NeumannState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, NeumannState]:
        del extra_args  # what other transformations of a chain need (value=, ...): not used here
        if params is None:
            raise ValueError("neumann_optax.neumann needs the parameters: call update(grads, state, params)")
        f = _float()
        lr = lr_at(state.count)
        s = state.count + 1
        burn_in = jnp.asarray(kw["burn_in_steps"], jnp.int32)
        in_burn_in = s <= burn_in
        t = s - burn_in
        is_reset = jnp.logical_and(jnp.logical_not(in_burn_in), t == state.next_reset)
        regular = jnp.logical_not(jnp.logical_or(in_burn_in, is_reset))
        mu = _momentum(t, kw["momentum"], kw["momentum_ramp_steps"], f)
        mu = jnp.where(in_burn_in, jnp.zeros([], f), mu)

        wd = kw["weight_decay"]
        grads = updates
        if not (_is_concrete(wd) and wd == 0):  # coupled L2, as torch.optim.SGD
            grads = jax.tree.map(lambda g, w: g + jnp.asarray(wd, _acc(w)).astype(w.dtype) * w, updates, params)
        # the regularizer: r over the whole tree, its coefficient c = alpha r - beta / r^3
        coef = jnp.zeros([], f)
        if state.v is not None:
            sq = sum(
                (jnp.sum(jnp.square((w - v).astype(_acc(w)))).astype(f) for w, v in _pairs(params, state.v)),
                start=jnp.zeros([], f),
            )
            r = jnp.sqrt(sq)
            n = sum(x.size for x in jax.tree.leaves(params))
            scale = _regularizer_scale(kw["regularizer_schedule"], lr, state.reference_lr)
            alpha = scale * jnp.asarray(kw["cubic_weight"], f)
            beta = scale * jnp.asarray(kw["repulsive_weight"], f) * n
            ok = jnp.logical_and(regular, jnp.logical_and(jnp.isfinite(r), r > 0))
            safe_r = jnp.where(ok, r, jnp.ones([], f))
            coef = jnp.where(ok, alpha * safe_r - beta / (safe_r * safe_r * safe_r), coef)
        # Every phase as one elementwise form with scalar factors (no array-sized selects):
        #   d = g + c (w - v);  m' = a m - b d;  w' = w + mu m' - lr d;  v' = v + k (w' - v)
        # burn-in: c = 0, a = 1, b = 0 (m stays 0), mu = 0, k = 0 (v stays w_0)
        # reset:   c = 0, a = 0, b = lr;  regular: a = mu, b = lr;  k = 1 - gamma in both
        zero, one = jnp.zeros([], f), jnp.ones([], f)
        a = jnp.where(in_burn_in, one, jnp.where(is_reset, zero, mu))
        b = jnp.where(in_burn_in, zero, lr)
        k = jnp.where(in_burn_in, zero, 1.0 - jnp.asarray(kw["ema_decay"], f))
        # The norm's reduction and the update as two passes. Left to itself, XLA's CPU compiler
        # fused them and ran the step 2-3x slower (benchmarks/optax_step_time.py); a barrier on
        # the parameters too (which optax.apply_updates reads again) cost as much.
        treedef = jax.tree.structure(params)
        if state.v is None:  # lean: d = g, no v (one pass, nothing to keep apart)
            g_l, w_l, m_l = (jax.tree.leaves(x) for x in (grads, params, state.m))
            lean_out = [_lean_leaf(g, w, m, a, b, mu, lr) for g, w, m in zip(g_l, w_l, m_l, strict=True)]
            deltas, ms = (jax.tree.unflatten(treedef, [o[i] for o in lean_out]) for i in range(2))
            vs = None
        else:
            coef, grads, m_b, v_b = jax.lax.optimization_barrier((coef, grads, state.m, state.v))

            def leaf(g: jax.Array, w: jax.Array, m: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
                t_ = _acc(w)
                g_, w_, m_, v_ = (x.astype(t_) for x in (g, w, m, v))
                c_, a_, b_, mu_, lr_, k_ = (x.astype(t_) for x in (coef, a, b, mu, lr, k))
                d = g_ + c_ * (w_ - v_)
                m_new = a_ * m_ - b_ * d
                delta = mu_ * m_new - lr_ * d
                v_new = v_ + k_ * ((w_ + delta) - v_)
                return delta.astype(w.dtype), m_new.astype(m.dtype), v_new.astype(v.dtype)

            leaves = (jax.tree.leaves(x) for x in (grads, params, m_b, v_b))
            out = [leaf(*xs) for xs in zip(*leaves, strict=True)]
            deltas, ms, vs = (jax.tree.unflatten(treedef, [o[i] for o in out]) for i in range(3))

        growth = jnp.asarray(kw["reset_growth"], f)
        grown = jnp.maximum(1, jnp.floor(growth * state.reset_interval.astype(f)).astype(jnp.int32))
        new_state = NeumannState(
            count=jnp.where(state.count < jnp.iinfo(jnp.int32).max, state.count + 1, state.count),
            next_reset=jnp.where(is_reset, state.next_reset + state.reset_interval, state.next_reset),
            reset_interval=jnp.where(is_reset, grown, state.reset_interval),
            last_momentum=jnp.where(in_burn_in, state.last_momentum, mu).astype(state.last_momentum.dtype),
            reference_lr=state.reference_lr,
            m=ms,
            v=vs,
        )
        return deltas, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _lean_leaf(g: jax.Array, w: jax.Array, m: jax.Array, *scalars: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One leaf of the lean form: ``d = g``, ``m' = a m - b d``, ``delta = mu m' - lr d``."""
    t_ = _acc(w)
    a_, b_, mu_, lr_ = (x.astype(t_) for x in scalars)
    d = g.astype(t_)
    m_new = a_ * m.astype(t_) - b_ * d
    return (mu_ * m_new - lr_ * d).astype(w.dtype), m_new.astype(m.dtype)


def _float() -> Any:
    """The default float dtype: float64 under ``jax_enable_x64``, else float32."""
    return jnp.asarray(0.0).dtype


def _acc(x: jax.Array) -> Any:
    """The arithmetic dtype of a leaf: at least float32 (bfloat16/float16 leaves are computed in
    float32 and rounded once, as torch's opmath does per operation)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _pairs(a: optax.Params, b: optax.Params) -> list[tuple[jax.Array, jax.Array]]:
    return list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _momentum(t: jax.Array, momentum: Any, tau: Any, f: Any) -> jax.Array:
    if isinstance(momentum, (tuple, list)):
        raw = 1.0 - 1.0 / (1.0 + t.astype(f) / jnp.asarray(tau, f))
        return jnp.clip(raw, jnp.asarray(momentum[0], f), jnp.asarray(momentum[1], f))
    return jnp.asarray(momentum, f)


def _regularizer_scale(schedule: Any, lr: jax.Array, reference: jax.Array) -> jax.Array:
    if isinstance(schedule, str) and schedule == "constant":
        return jnp.ones([], lr.dtype)
    ratio = jnp.where(reference > 0, lr / jnp.where(reference > 0, reference, 1.0), 1.0)
    if isinstance(schedule, str):  # "lr"
        return ratio
    return jnp.where(reference > 0, ratio ** jnp.asarray(schedule, lr.dtype), 1.0)


def evaluation_params(params: optax.Params, state: Any) -> optax.Params:
    """The weights to evaluate and export, ``w - mu m`` (a pure function, as optax's
    ``schedule_free_eval_params``).

    ``state`` is the :func:`neumann` state or any optax state holding it (inside ``optax.chain``,
    ``optax.MultiSteps``, ``optax.apply_if_finite``, ``optax.inject_hyperparams``); with
    ``optax.partition`` every partition's Neumann state shifts its own parameters.
    """
    found = [
        x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, NeumannState)) if isinstance(x, NeumannState)
    ]
    if not found:
        raise ValueError("neumann_optax.evaluation_params: no Neumann state found in the optimizer state")
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    shifted = params
    for st in found:
        mu = st.last_momentum

        def shift(m: Any, w: jax.Array, mu: jax.Array = mu) -> jax.Array:
            if is_masked(m):
                return w
            return (w.astype(_acc(w)) - mu.astype(_acc(w)) * m.astype(_acc(w))).astype(w.dtype)

        shifted = jax.tree.map(shift, st.m, shifted, is_leaf=is_masked)
    return shifted
