"""``torch.optim.Optimizer`` front end of the Neumann optimizer (SPEC section 3).

The class validates hyperparameters, keeps the counters and per-parameter state, decides each
step's phase on the host, and hands plain tensors to :mod:`neumann_optimizer.functional`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _native
from . import functional as F
from ._distributed import all_ranks_true, all_reduce_squared_norm, is_dtensor, local_tensor
from .schedule import Phase, constant_momentum, next_reset_interval, plan_step

__all__ = ["Neumann"]

_NONFINITE_MODES = ("skip", "raise", "ignore")
# Group entries the optimizer keeps for itself (saved in state_dict()["param_groups"]).
_COUNTERS = {
    "step": 0,  # s: number of applied steps
    "next_reset": 1,  # Neumann-phase step t of the next iterate reset
    "reset_interval": None,  # K_j, the current reset interval (filled from reset_steps)
    "last_momentum": 0.0,  # mu of the last applied step (evaluation weights w - mu m)
    "skipped_steps": 0,  # steps skipped for a non-finite gradient
    "train_mode": True,  # False between eval() and train()
    "eval_shift": 0.0,  # mu subtracted in place by eval(evaluation="in_place"); train() adds it back
}
_EVALUATION_MODES = ("exact", "in_place")


def _resolve_steps(name: str, given: float | None, epochs: int, steps_per_epoch: int | None) -> float:
    if given is not None:
        return given
    if steps_per_epoch is None:
        raise ValueError(
            f"Neumann: {name} is not given and neither is steps_per_epoch; pass "
            f"steps_per_epoch=len(train_loader) to use the paper's default "
            f"({epochs} epoch{'s' if epochs != 1 else ''}), or give {name} in steps"
        )
    return epochs * steps_per_epoch


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Neumann: {name} must be an int >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high != math.inf else "")
        raise ValueError(f"Neumann: {name} must be a finite number {bound}, got {value!r}")


def _validate_group(group: dict[str, Any]) -> None:
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Neumann: a tensor lr must have exactly one element")
    else:
        _check_float("lr", lr, 0.0)
    _check_int("burn_in_steps", group["burn_in_steps"], 0)
    _check_int("reset_steps", group["reset_steps"], 1)
    _check_float("reset_growth", group["reset_growth"], 0.0, open_low=True)
    _check_float("momentum_ramp_steps", group["momentum_ramp_steps"], 0.0, open_low=True)
    mom = group["momentum"]
    if isinstance(mom, (tuple, list)):
        if len(mom) != 2:
            raise ValueError(f"Neumann: momentum must be a pair (mu_min, mu_max) or a number, got {mom!r}")
        _check_float("momentum[0] (mu_min)", mom[0], 0.0, 1.0)
        _check_float("momentum[1] (mu_max)", mom[1], 0.0, 1.0)
        if mom[0] > mom[1]:
            raise ValueError(f"Neumann: momentum must satisfy mu_min <= mu_max, got {tuple(mom)!r}")
        group["momentum"] = tuple(float(x) for x in mom)
    else:
        group["momentum"] = constant_momentum(mom)
    _check_float("cubic_weight", group["cubic_weight"], 0.0)
    _check_float("repulsive_weight", group["repulsive_weight"], 0.0)
    _check_float("ema_decay", group["ema_decay"], 0.0, 1.0)
    _check_float("weight_decay", group["weight_decay"], 0.0)
    if group.get("evaluation", "exact") not in _EVALUATION_MODES:
        raise ValueError(f"Neumann: evaluation must be one of {_EVALUATION_MODES}, got {group['evaluation']!r}")
    sched = group["regularizer_schedule"]
    if sched not in ("constant", "lr"):
        ok = isinstance(sched, (int, float)) and not isinstance(sched, bool) and math.isfinite(sched) and sched >= 0
        if not ok:
            raise ValueError(
                "Neumann: regularizer_schedule must be 'constant', 'lr' or a power p >= 0 "
                f"(alpha, beta scaled by (lr / initial lr) ** p), got {sched!r}"
            )


class Neumann(Optimizer):
    r"""The Neumann optimizer (Krishnan, Xiao & Saurous, 2017, arXiv:1712.03298, Algorithm 2).

    A large-batch optimizer that implicitly inverts each mini-batch's Hessian through a Neumann
    series, at the cost and memory of Adam (two buffers per parameter: the Neumann iterate
    ``m`` and a moving average ``v`` of the weights). Only ``lr`` needs tuning.

    With ``s`` the number of applied steps, ``B`` = ``burn_in_steps`` and ``t = s - B``, each step
    of a parameter group does, with ``g`` the gradient (plus ``weight_decay * w``):

    .. code-block:: text

        s <= B (burn-in, plain SGD):  w <- w - lr g                 (v = w_0 and m = 0 are kept)
        t is a reset step:            m <- -lr g
                                      w <- w + mu_t m - lr g;  v <- w + gamma (v - w)
        otherwise:                    x = w - v,  r = ||x|| over the whole group
                                      d = g + (alpha r^2 - beta / r^2) x / r      (d = g if r == 0)
                                      m <- mu_t m - lr d
                                      w <- w + mu_t m - lr d;  v <- w + gamma (v - w)

    with ``mu_t = clip(1 - 1/(1 + t/tau), mu_min, mu_max)``, reset steps ``t = 1, 1+K_0,
    1+K_0+K_1, ...`` where ``K_{j+1} = max(1, floor(reset_growth * K_j))``, ``alpha`` =
    ``cubic_weight``, ``beta = repulsive_weight * n`` (``n`` scalars in the group) and ``gamma`` =
    ``ema_decay``. The parameters the optimizer holds are Algorithm 2's *displaced* weights; the
    weights to evaluate or export are ``w - mu m`` (:meth:`eval`, :meth:`evaluation_weights`).
    The paper's OCR errata and all choices are in the project's SPEC.

    Args:
        params: parameters or parameter groups (named parameters are accepted too: their names
            then appear in error messages). Every group has its own norm and its own ``n``.
        lr: learning rate ``eta`` (the one hyperparameter to tune); read at every step, so every
            ``torch.optim.lr_scheduler`` works.
        steps_per_epoch: steps in one epoch; gives the paper's epoch-denominated defaults
            (burn-in 5 epochs, first reset interval 10 epochs, momentum ramp 1 epoch).
        burn_in_steps: ``B``, steps of plain SGD before the Neumann phase.
        reset_steps: ``K_0``, Neumann-phase steps between the first two iterate resets.
        reset_growth: factor by which the reset interval grows after every reset (2: doubling).
        momentum: ``(mu_min, mu_max)``, the paper's ramp (equal values give a constant momentum),
            or one number ``mu``: a constant momentum for the Neumann phase (burn-in stays plain
            SGD). A scheduler that writes ``param_group["momentum"]`` (``OneCycleLR`` and
            ``CyclicLR`` with ``cycle_momentum=True``) thereby sets the ``mu`` of the next step;
            ``param_group["last_momentum"]`` reports the ``mu`` the last step used.
        momentum_ramp_steps: ``tau`` of the momentum ramp (unused with a constant momentum).
        cubic_weight: ``alpha``, weight of the cubic regularizer ``alpha/3 ||w - v||^3``.
        repulsive_weight: ``beta / n``, weight of the repulsive term ``beta / ||w - v||``.
        ema_decay: ``gamma``, decay of the moving average ``v`` of the weights.
        weight_decay: coupled L2 penalty added to the gradient (as ``torch.optim.SGD``).
        regularizer_schedule: ``"constant"`` (the paper, default) or ``"lr"``: an opt-in variant
            (ours, not the paper's) that scales ``alpha`` and ``beta`` by ``lr / reference_lr``,
            the learning rate's ratio to its value when the group was created, so the
            regularizers decay with the learning-rate schedule.
        nonfinite: what to do when a gradient holds inf or NaN: ``"skip"`` (default) leaves
            weights and state untouched, warns and counts the step in
            ``param_groups[i]["skipped_steps"]``; ``"raise"`` raises naming the parameter;
            ``"ignore"`` does no check (fastest, no host synchronisation).
        evaluation: how :meth:`eval` switches to ``w - mu m``. ``"exact"`` (default) keeps a copy of
            the training weights (+1x parameter memory while in eval mode) and :meth:`train`
            restores them bit for bit, so evaluating never changes a training run. ``"in_place"``
            keeps no copy: ``eval`` subtracts ``mu m`` and ``train`` adds it back, which restores
            ``w`` to within float rounding (one rounding per switch; training is then no longer
            bit-identical to a run without evaluations). For models whose weights do not fit
            twice in memory.
        foreach: use the multi-tensor ``torch._foreach_*`` kernels; ``None`` picks them when
            all parameters are on an accelerator and the for-loop on CPU (as ``torch.optim``).
        fused: one pass over the tensors per step. On CPU (float32 or float64, contiguous) a small C
            kernel of ours (``_native.c``, compiled at first use with the system C compiler and
            OpenMP, about a second, cached on disk) that also sums the norm ``||w - v||`` the next
            step needs, so a step moves Adam's 28 bytes per parameter. That norm is carried from
            step to step while the tensors' version counters show no change; an in-place change
            that torch sees (``p.mul_()``, ``load_state_dict``, ``eval()``) makes the next step sum
            it afresh. A write through ``.data`` is not seen: the next step's regularizer then
            uses the norm from before that write (that one step only; its pass sums the true
            norm again). Elsewhere (CUDA, other dtypes, where the kernel
            does not compile, inside ``torch.compile``) one ``torch.compile``d graph: the group norm
            (one read of ``w`` and ``v``), then the update; it compiles on the first step of each
            phase (tens of seconds on CPU for a 100-tensor model, cached on disk) and falls back to
            the multi-tensor path with a warning where compilation fails. ``None`` (default): the
            CPU kernel wherever it applies and ``foreach`` is not given; else the compiled graph for
            CPU groups of at least 2^20 scalars; else ``foreach``'s choice.
            ``NEUMANN_OPTIMIZER_NATIVE=0`` turns the CPU kernel off.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float | Tensor,
        *,
        steps_per_epoch: int | None = None,
        burn_in_steps: int | None = None,
        reset_steps: int | None = None,
        reset_growth: float = 2.0,
        momentum: tuple[float, float] | float = (0.5, 0.9),
        momentum_ramp_steps: float | None = None,
        cubic_weight: float = 1e-7,
        repulsive_weight: float = 1e-5,
        ema_decay: float = 0.99,
        weight_decay: float = 0.0,
        regularizer_schedule: str = "constant",
        nonfinite: str = "skip",
        evaluation: str = "exact",
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if steps_per_epoch is not None:
            _check_int("steps_per_epoch", steps_per_epoch, 1)
        if nonfinite not in _NONFINITE_MODES:
            raise ValueError(f"Neumann: nonfinite must be one of {_NONFINITE_MODES}, got {nonfinite!r}")
        for flag, value in (("foreach", foreach), ("fused", fused)):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"Neumann: {flag} must be None, True or False, got {value!r}")
        if fused and foreach:
            raise ValueError("Neumann: choose one of fused=True and foreach=True")
        defaults = dict(
            lr=lr,
            burn_in_steps=_resolve_steps("burn_in_steps", burn_in_steps, 5, steps_per_epoch),
            reset_steps=_resolve_steps("reset_steps", reset_steps, 10, steps_per_epoch),
            reset_growth=reset_growth,
            momentum=momentum,
            momentum_ramp_steps=_resolve_steps(
                "momentum_ramp_steps",
                momentum_ramp_steps,
                1,
                steps_per_epoch,
            ),
            cubic_weight=cubic_weight,
            repulsive_weight=repulsive_weight,
            ema_decay=ema_decay,
            weight_decay=weight_decay,
            regularizer_schedule=regularizer_schedule,
            nonfinite=nonfinite,
            evaluation=evaluation,
            foreach=foreach,
            fused=fused,
        )
        _validate_group(dict(defaults))
        self._fused_failed = False  # set when torch.compile failed: the fused path is off for good
        self._plain: dict[int, bool] = {}  # per group index: all parameters plain real tensors
        # per group index: (signature of w and v, local sum ||w - v||^2) after the last CPU-kernel pass
        self._carried: dict[int, tuple[tuple, float]] = {}
        # per group index: what the last applied step did (read through step_record())
        self._records: dict[int, tuple[Any, ...]] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_plain"):
            self._plain.pop(len(self.param_groups) - 1, None)
        group = self.param_groups[-1]
        _validate_group(group)
        for key, default in _COUNTERS.items():
            group.setdefault(key, group["reset_steps"] if key == "reset_interval" else default)
        group.setdefault("reference_lr", float(group["lr"]))
        if not all(g["train_mode"] for g in self.param_groups):
            raise RuntimeError("Neumann: call optimizer.train() before adding a parameter group")
        for p in group["params"]:
            if p.is_sparse:
                raise ValueError("Neumann does not support sparse parameters")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_plain", {})
        self.__dict__.setdefault("_fused_failed", False)
        self.__dict__["_carried"] = {}
        self.__dict__["_records"] = {}
        for group in self.param_groups:
            group.setdefault("nonfinite", "skip")
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("regularizer_schedule", "constant")
            group.setdefault("evaluation", "exact")
            group.setdefault("reference_lr", float(group["lr"]))
            for key, default in _COUNTERS.items():
                group.setdefault(key, group["reset_steps"] if key == "reset_interval" else default)

    def __repr__(self) -> str:
        keys = (
            "lr",
            "burn_in_steps",
            "reset_steps",
            "reset_growth",
            "momentum",
            "momentum_ramp_steps",
            "cubic_weight",
            "repulsive_weight",
            "ema_decay",
            "weight_decay",
            "regularizer_schedule",
        )
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {group[k]}" for k in keys]
            lines.append(f"    step: {group['step']}  (skipped: {group['skipped_steps']})")
        lines.append(")")
        return "\n".join(lines)

    def _param_name(self, gi: int, pi: int) -> str:
        group = self.param_groups[gi]
        names = group.get("param_names")
        p = group["params"][pi]
        label = f"'{names[pi]}'" if names else f"#{pi}"
        return f"parameter {label} of param group {gi} (shape {tuple(p.shape)})"

    @property
    def training(self) -> bool:
        """False between :meth:`eval` and :meth:`train`."""
        return all(g["train_mode"] for g in self.param_groups)

    # ------------------------------------------------------------------ the step
    def _gather(self) -> list[tuple[int, list[int], list[Tensor], list[Tensor]]]:
        """Per group: (group index, indices of params with grads, those params, their grads)."""
        out = []
        for gi, group in enumerate(self.param_groups):
            idx, ps, gs = [], [], []
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"Neumann does not support sparse gradients ({self._param_name(gi, pi)})")
                if p.grad.is_complex() != p.is_complex():
                    raise RuntimeError(f"Neumann: gradient and {self._param_name(gi, pi)} differ in complexity")
                idx.append(pi)
                ps.append(p)
                gs.append(p.grad)
            out.append((gi, idx, ps, gs))
        return out

    def _all_finite(self, gathered: list[tuple[int, list[int], list[Tensor], list[Tensor]]]) -> bool:
        """One read of every gradient: a sum is finite iff no element is inf or NaN (barring a
        float overflow of the sum itself, beyond 3e38 in float32). One host synchronisation."""
        grads = [g for gi, _, _, gs in gathered for g in self._local(gi, gs)]
        if not grads:
            return True
        if all(_wants_native(group) for group in self.param_groups) and _native_ok(grads):
            return all_reduce_flag(_native.all_finite(grads), gathered)  # one C pass, stops at the first
        sums = [g.sum(dtype=torch.float32) for g in grads]
        dev = sums[0].device
        finite = bool(torch.isfinite(torch.stack([s.to(dev) for s in sums])).all())
        return all_reduce_flag(finite, gathered)

    def _raise_nonfinite(self, gathered: list[tuple[int, list[int], list[Tensor], list[Tensor]]]) -> None:
        for gi, idx, _, gs in gathered:
            for pi, g in zip(idx, gs, strict=True):
                if not bool(torch.isfinite(local_tensor(g)).all()):
                    raise FloatingPointError(f"Neumann: non-finite gradient in {self._param_name(gi, pi)}")
        raise FloatingPointError("Neumann: non-finite gradient on another rank")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one step to every parameter that has a gradient; return ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.training:
            raise RuntimeError(
                "Neumann.step() called in evaluation mode: the parameters hold the evaluation "
                "weights w - mu m; call optimizer.train() before training again"
            )
        gathered = self._gather()
        mode = self.param_groups[0]["nonfinite"] if self.param_groups else "ignore"
        if mode != "ignore" and not self._all_finite(gathered):
            if mode == "raise":
                self._raise_nonfinite(gathered)
            for group in self.param_groups:
                group["skipped_steps"] += 1
            warnings.warn(
                "Neumann: non-finite gradient, step skipped (weights and state untouched); "
                f"{self.param_groups[0]['skipped_steps']} skipped so far",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss
        for gi, _, params, grads in gathered:
            self._step_group(gi, params, grads)
        return loss

    def _step_group(self, gi: int, params: list[Tensor], grads: list[Tensor]) -> None:
        group = self.param_groups[gi]
        plan = plan_step(group["step"], group["burn_in_steps"], group["next_reset"], group)
        if params:
            ms, vs = [], []
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["v"] = p.detach().clone(memory_format=torch.preserve_format)
                ms.append(state["m"])
                vs.append(state["v"])
            sq = self._update(gi, plan.phase, plan.momentum, params, grads, ms, vs)
            self._records[gi] = (plan, float(group["lr"]), sq, *regularizer_weights(group))
        group["step"] += 1
        if plan.phase is not Phase.BURN_IN:
            group["last_momentum"] = plan.momentum
        if plan.phase is Phase.RESET:
            group["next_reset"] += group["reset_interval"]
            group["reset_interval"] = next_reset_interval(group["reset_interval"], group["reset_growth"])

    def _is_plain(self, gi: int) -> bool:
        """All parameters of group ``gi`` are plain real tensors (no DTensor, no complex); cached."""
        plain = self._plain.get(gi)
        if plain is None:
            plain = self._plain[gi] = not any(is_dtensor(p) or p.is_complex() for p in self.param_groups[gi]["params"])
        return plain

    def _local(self, gi: int, ts: list[Tensor]) -> list[Tensor]:
        """The real local tensors the kernels work on: ``ts`` itself for a plain group."""
        return ts if self._is_plain(gi) else [_real(local_tensor(t)) for t in ts]

    def _update(
        self,
        gi: int,
        phase: Phase,
        mu: float,
        params: list[Tensor],
        grads: list[Tensor],
        ms: list[Tensor],
        vs: list[Tensor],
    ) -> Tensor | float | None:
        """One group's update on the chosen path; returns the squared group norm ``||w - v||^2``
        the regularizer used (Neumann phase; ``None`` where the path kept it on the device)."""
        group = self.param_groups[gi]
        plain = self._is_plain(gi)
        lw, lg, lm, lv = (self._local(gi, ts) for ts in (params, grads, ms, vs))
        alpha, beta = regularizer_weights(group) if phase is Phase.NEUMANN else (0.0, 0.0)
        kwargs = dict(
            phase=phase,
            lr=float(group["lr"]),
            momentum=mu,
            ema_decay=group["ema_decay"],
            weight_decay=group["weight_decay"],
        )
        if _wants_native(group) and _native_ok(lw, lg, lm, lv):
            return self._native_update(gi, params, vs, lw, lg, lm, lv, alpha, beta, **kwargs)
        self._carried.pop(gi, None)  # a step on another path: its norm was not summed
        fused = self._use_fused(group, lw)
        foreach = group["foreach"]
        if foreach is None:
            foreach = all(p.device.type != "cpu" for p in lw)
        sq: Tensor | None = None
        if fused:
            try:
                coef = None  # the compiled graph reduces the norm itself ...
                if phase is Phase.NEUMANN and not plain:  # ... unless shards must be summed first
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
            except Exception as exc:  # compilation unavailable: fall back for good, loudly
                self._fused_fallback(exc)
            foreach = True
        coef = None
        if phase is Phase.NEUMANN:
            sq = all_reduce_squared_norm(F.squared_distance(lw, lv, foreach), params)
            coef = F.regularizer_coefficient(sq.sqrt(), alpha, beta)
        F.neumann_update(lw, lg, lm, lv, coef=coef, foreach=foreach, **kwargs)
        return sq

    # ------------------------------------------------------------------ the CPU kernel
    def _native_update(
        self,
        gi: int,
        params: list[Tensor],
        vs: list[Tensor],
        lw: list[Tensor],
        lg: list[Tensor],
        lm: list[Tensor],
        lv: list[Tensor],
        alpha: float,
        beta: float,
        *,
        phase: Phase,
        lr: float,
        momentum: float,
        ema_decay: float,
        weight_decay: float,
    ) -> float | None:
        """One pass of the C kernel. The group norm a regular step needs is the one the
        previous pass summed, if no tensor changed since (same tensors, same version counters);
        otherwise it is summed afresh (one read of ``w`` and ``v``)."""
        coef, sq = 0.0, None
        if phase is Phase.NEUMANN:
            carried = self._carried.get(gi)
            if carried is not None and carried[0] == _signature(params, vs, lw, lv):
                sq = carried[1]
            else:
                sq = _native.squared_distance(lw, lv)
            if not self._is_plain(gi):  # local sum of the shards -> sum over ranks
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
        self._carried[gi] = (_signature(params, vs, lw, lv), sq_next)
        return sq

    def _fused_fallback(self, exc: Exception) -> None:
        self._fused_failed = True
        warnings.warn(
            f"Neumann: the fused (torch.compile) path failed ({type(exc).__name__}: {exc}); "
            "falling back to the multi-tensor path",
            RuntimeWarning,
            stacklevel=5,
        )

    def _use_fused(self, group: dict[str, Any], lw: list[Tensor]) -> bool:
        fused = group["fused"]
        if fused is None:
            fused = _default_fused(lw)
        if not fused or self._fused_failed:
            return False
        if len({(t.device, t.dtype) for t in lw}) != 1 or not lw[0].is_floating_point():
            if group["fused"]:
                raise RuntimeError("Neumann(fused=True) needs the parameters of a group on one device, in one dtype")
            return False
        return True

    def step_record(self, group: int = 0) -> dict[str, Any] | None:
        """What the last applied step of param group ``group`` did, as plain Python numbers
        (``None`` before its first step). Reading it synchronises with the device once.

        Keys: ``step`` (s), ``phase`` (``"burn_in"``, ``"reset"`` or ``"neumann"``), ``lr``,
        ``momentum`` (mu), ``distance`` (r = ||w - v|| over the group before the update; ``None``
        outside the regularized phase, and on the compiled path for sharded groups), ``cubic_weight``
        and ``repulsive_weight_total`` (alpha and beta as applied, schedules included),
        ``coefficient`` (c = alpha r - beta / r^3, so the regularizer's displacement is ``c x``),
        ``repulsive_force`` (beta / r^2, the norm of the repulsive term of ``d``) and
        ``cubic_force`` (alpha r^2). Not saved in ``state_dict()``.
        """
        rec = self._records.get(group)
        if rec is None:
            return None
        plan, lr, sq, alpha, beta = rec
        out: dict[str, Any] = dict(
            step=self.param_groups[group]["step"],
            phase=plan.phase.value,
            lr=lr,
            momentum=plan.momentum,
            distance=None,
            cubic_weight=alpha,
            repulsive_weight_total=beta,
            coefficient=None,
            repulsive_force=None,
            cubic_force=None,
        )
        if plan.phase is Phase.NEUMANN and sq is not None:
            sq = float(sq)
            r = math.sqrt(sq) if sq >= 0 else math.nan
            ok = math.isfinite(r) and r > 0
            out.update(
                distance=r,
                coefficient=alpha * r - beta / r**3 if ok else 0.0,
                repulsive_force=beta / r**2 if ok else 0.0,
                cubic_force=alpha * r**2 if ok else 0.0,
            )
        return out

    # ------------------------------------------------------------------ evaluation weights
    @torch.no_grad()
    def eval(self) -> None:
        """Switch the parameters to the evaluation weights ``w - mu m`` (idempotent).

        With ``evaluation="exact"`` (default) the training weights are kept aside and
        :meth:`train` restores them bit for bit; with ``evaluation="in_place"`` nothing is copied
        and :meth:`train` adds ``mu m`` back (within float rounding). With BatchNorm, recompute
        the running statistics afterwards (``torch.optim.swa_utils.update_bn``).
        """
        for group in self.param_groups:
            if not group["train_mode"]:
                continue
            mu = group["last_momentum"]
            exact = group["evaluation"] == "exact"
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "m" not in state:
                    continue
                if exact:
                    state["train_param"] = p.detach().clone(memory_format=torch.preserve_format)
                if mu != 0.0:
                    p.add_(state["m"], alpha=-mu)
            group["eval_shift"] = 0.0 if exact else mu
            group["train_mode"] = False

    @torch.no_grad()
    def train(self, mode: bool = True) -> None:
        """Back to the training weights: restored bit for bit from the copy :meth:`eval` kept, or
        (``evaluation="in_place"``) by adding ``mu m`` back. Idempotent."""
        if not mode:
            self.eval()
            return
        for group in self.param_groups:
            if group["train_mode"]:
                continue
            shift = group["eval_shift"]
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                if "train_param" in state:
                    p.copy_(state.pop("train_param"))
                elif shift != 0.0 and "m" in state:
                    p.add_(state["m"], alpha=shift)
            group["eval_shift"] = 0.0
            group["train_mode"] = True

    @torch.no_grad()
    def _adopt_evaluation_weights(self) -> None:
        """Declare the parameters' current values the evaluation weights and forget the training
        weights (eval mode; :meth:`train` then leaves the parameters as they are). For callers that
        loaded evaluation weights into the model themselves (HF ``load_best_model_at_end``)."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state.get(p, {}).pop("train_param", None)
            group["eval_shift"] = 0.0
            group["train_mode"] = False

    @torch.no_grad()
    def evaluation_weights(self) -> dict[Tensor, Tensor]:
        """New tensors holding ``w - mu m`` for every parameter, without touching the model.

        Parameters that were never stepped map to a copy of themselves. Works in either mode.
        """
        out: dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            mu = group["last_momentum"]
            for p in group["params"]:
                state = self.state.get(p, {})
                if not group["train_mode"] or "m" not in state:
                    out[p] = p.detach().clone()  # eval mode: p already holds w - mu m
                else:
                    out[p] = p.detach().clone().add_(state["m"], alpha=-mu)
        return out

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        """Context manager: evaluation weights inside, training weights restored on exit."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            if was_training:
                self.train()

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict after checking that it is a Neumann state of the same model."""
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)
        self._carried.clear()

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("Neumann.load_state_dict: expected a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"Neumann.load_state_dict: the state dict has {len(saved_groups)} parameter groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            missing = [k for k in ("burn_in_steps", "reset_steps", "ema_decay", "step", "next_reset") if k not in saved]
            if missing:
                raise ValueError(
                    f"Neumann.load_state_dict: param group {gi} lacks {missing}: "
                    "not a state dict of a Neumann optimizer"
                )
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"Neumann.load_state_dict: param group {gi} has {len(saved['params'])} parameters "
                    f"in the state dict and {len(group['params'])} here: a state dict of another model?"
                )
            for pi, (key, p) in enumerate(zip(saved["params"], group["params"], strict=True)):
                pstate = state_dict["state"].get(key)
                if not pstate:
                    continue
                for name in ("m", "v", "train_param"):
                    t = pstate.get(name)
                    if t is not None and tuple(t.shape) != tuple(p.shape):
                        raise ValueError(
                            f"Neumann.load_state_dict: state '{name}' of {self._param_name(gi, pi)} "
                            f"has shape {tuple(t.shape)}: a state dict of another model?"
                        )
                if "m" not in pstate or "v" not in pstate:
                    raise ValueError(
                        f"Neumann.load_state_dict: state of {self._param_name(gi, pi)} lacks 'm' or 'v': "
                        "not a state dict of a Neumann optimizer"
                    )


def regularizer_scale(group: dict[str, Any]) -> float:
    """The factor on ``alpha`` and ``beta`` at the group's next step: 1 (``"constant"``, the
    paper), ``lr / reference_lr`` (``"lr"``) or ``(lr / reference_lr) ** p`` (a number ``p``)."""
    sched = group["regularizer_schedule"]
    if sched == "constant" or group["reference_lr"] <= 0:
        return 1.0
    ratio = float(group["lr"]) / group["reference_lr"]
    return ratio if sched == "lr" else ratio ** float(sched)


def regularizer_weights(group: dict[str, Any]) -> tuple[float, float]:
    """``(alpha, beta)`` of a group's next regularized step: ``beta = repulsive_weight * n``, both
    scaled by :func:`regularizer_scale`."""
    n = sum(_real_numel(p) for p in group["params"] if p.requires_grad)
    scale = regularizer_scale(group)
    return scale * group["cubic_weight"], scale * group["repulsive_weight"] * n


def all_reduce_flag(finite: bool, gathered: list[tuple[int, list[int], list[Tensor], list[Tensor]]]) -> bool:
    """Agree across ranks on skipping (a sharded gradient may be non-finite on one rank only)."""
    params = [p for _, _, ps, _ in gathered for p in ps]
    return all_ranks_true(finite, params)


FUSED_DEFAULT_MIN_NUMEL = 2**20


def _default_fused(lw: list[Tensor]) -> bool:
    """Where ``fused=None`` uses the compiled graph when the CPU kernel does not apply (say,
    bfloat16 parameters, or no C compiler): CPU groups of at least 2^20 scalars.

    There ``benchmarks/step_time.py`` measured it 1.5-2x faster than the for-loop path (the
    torch.optim default on CPU), and the one-off compilation (tens of seconds, cached on disk)
    is small against a run long enough to matter. Small models keep the for-loop path and start
    at once. On accelerators it has not been measured yet, so the default stays the multi-tensor
    path there, as in torch.optim.
    """
    return all(t.device.type == "cpu" for t in lw) and sum(t.numel() for t in lw) >= FUSED_DEFAULT_MIN_NUMEL


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


def _real_numel(p: Tensor) -> int:
    return p.numel() * (2 if p.is_complex() else 1)
