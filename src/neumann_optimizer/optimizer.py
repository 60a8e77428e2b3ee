"""``torch.optim.Optimizer`` front end of the Neumann optimizer (SPEC section 3).

The class validates hyperparameters, keeps the counters and per-parameter state, decides each
step's phase on the host, and hands plain tensors to :mod:`neumann_optimizer.functional`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import functional as F
from ._advice import ScheduleWarning, check_run_length, warn_scheduler_momentum
from ._checkpoint import buffers, check_state_dict, saved_averages, v_dtype, with_shapes, without_shapes
from ._distributed import is_dtensor, local_tensor
from ._evaluation import EvaluationWeights
from ._graph_step import SYNC_EVERY, constants_of, device_update, refresh, schedule_of, sync_counters
from ._hyperparams import (
    EPOCH_DEFAULTS,
    NONFINITE_MODES,
    check_gradient,
    check_int,
    describe_groups,
    describe_step,
    is_lean,
    regularizer_scale,
    regularizer_weights,
    resolve_group,
    split_momentum,
    upgrade_group,
    validate_group,
)
from ._nonfinite import DIVERGED_AFTER, DivergedWarning, count_skip, finite_flags, raise_nonfinite
from ._paths import _real, device_scheduled, update_group
from .schedule import COUNTER_KEYS, Phase, advance, factors, scheduler_wrote_momentum

__all__ = [
    "DIVERGED_AFTER",
    "DivergedWarning",
    "Neumann",
    "ScheduleWarning",
    "regularizer_scale",
    "regularizer_weights",
]


class Neumann(EvaluationWeights, Optimizer):
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
            ``torch.optim.lr_scheduler`` works. May be left out when every group carries its own
            (any group may also carry the step counts or its own ``steps_per_epoch``).
        steps_per_epoch: steps in one epoch; gives the paper's epoch-denominated defaults
            (burn-in 5 epochs, first reset interval 10 epochs, momentum ramp 1 epoch).
        burn_in_steps: ``B``, steps of plain SGD before the Neumann phase.
        reset_steps: ``K_0``, Neumann-phase steps between the first two iterate resets.
        reset_growth: factor by which the reset interval grows after every reset (2: doubling).
        momentum: ``(mu_min, mu_max)``, the paper's ramp (equal values give a constant momentum),
            or one number ``mu``: a constant momentum for the Neumann phase (burn-in stays plain
            SGD). Kept in ``param_group["momentum_bounds"]`` as a pair. ``param_group["momentum"]``
            is a float, as momentum monitors (Lightning's ``LearningRateMonitor``) expect: the
            ``mu`` the last step used (0.0 before the first step and during burn-in; also in
            ``param_group["last_momentum"]``). A scheduler that writes ``param_group["momentum"]``
            (``OneCycleLR`` and ``CyclicLR`` with ``cycle_momentum=True``) thereby sets the ``mu``
            of the next step, and from its first write on the group follows it, not the ramp.
        momentum_ramp_steps: ``tau`` of the momentum ramp (unused with a constant momentum).
        cubic_weight: ``alpha``, weight of the cubic regularizer ``alpha/3 ||w - v||^3`` (the paper's
            1e-7; the project's sweep found no better strength, and worse ones from 1e-3 up). With it and
            ``repulsive_weight`` both 0 a group takes the lean step: no ``v`` in its state and no
            norm (``d = g``); switching either on later starts ``v`` from the weights of that step.
        repulsive_weight: ``beta / n``, weight of the repulsive term ``beta / ||w - v||``. Default 0
            (no repulsive term): **the one default that leaves the paper**, whose Table 1 has 1e-5;
            pass ``repulsive_weight=1e-5`` for the paper's algorithm exactly. As the learning rate
            decays, ``r = ||w - v||`` shrinks with the step and the repulsion ``beta / r^2`` comes to
            dominate the update; in our studies it undid the last 40% of training (docs/SPEC.md,
            "Deviations from the paper", has the numbers).
        ema_decay: ``gamma``, decay of the moving average ``v`` of the weights.
        weight_decay: coupled L2 penalty added to the gradient (as ``torch.optim.SGD``).
        regularizer_schedule: ``"constant"`` (the paper) scales nothing; ``"lr"`` or a number ``p``
            (our variants, not the paper's) scale ``alpha`` and ``beta`` by ``lr / reference_lr``
            or ``(lr / reference_lr) ** p``, the learning rate's ratio to its value when the group
            was created, so the regularizers decay with the learning-rate schedule.
        nonfinite: what to do when a group's gradients hold inf or NaN (each group by its own
            value and its own gradients): ``"skip"`` (default) leaves that group's weights and
            state untouched (the other groups step) and counts it in ``param_groups[i]["skipped_steps"]``
            (warning at the 1st, 10th, 100th, ... skip, and once with a :class:`DivergedWarning`
            when 100 steps in a row were skipped); ``"raise"`` raises naming the parameter, before
            any group is written;
            ``"ignore"`` does no check (fastest, no host synchronisation). On the host schedule the
            check costs one host read per step, as GradScaler's ``found_inf``; with GradScaler, which
            has checked the gradients already, ``"ignore"`` saves it. On the device schedule (inside
            ``torch.compile``, ``fused=True`` off the C kernel, ``capturable=True``) ``"skip"`` reads
            nothing: a skipped step writes nothing and is not counted there; ``param_groups``
            counts each such step as applied and is corrected, with the warnings owed, every 100
            steps of the group and whenever ``state_dict()``, ``eval()``/``train()`` or
            ``step_record()`` read it.
        evaluation: how :meth:`eval` switches to ``w - mu m``. ``"exact"`` (default) keeps a copy of
            the training weights (+1x parameter memory while in eval mode) and :meth:`train`
            restores them bit for bit, so evaluating never changes a training run. ``"in_place"``
            keeps no copy: ``eval`` subtracts ``mu m`` and ``train`` adds it back, which restores
            ``w`` to within float rounding (one rounding per switch; training is then no longer
            bit-identical to a run without evaluations). For models whose weights do not fit
            twice in memory.
        foreach: ``True``: the multi-tensor ``torch._foreach_*`` step; ``False``: the for-loop;
            ``None``: the C kernel where it applies (and ``fused`` allows), else multi-tensor.
        fused: ``True``: one pass over each tensor per step. On CPU (float32/float64, dense tensors
            whose ``w``, ``g``, ``m``, ``v`` share their strides) a C kernel of ours (``_native.c``,
            compiled at first use with the system C compiler, about a second, cached on disk) that
            also sums the norm ``||w - v||`` the next step needs, so a regular step moves Adam's 28
            bytes per parameter; the carried norm is summed afresh after any in-place change torch
            sees (a write through ``.data`` is seen one step late). Elsewhere (accelerators, other
            dtypes) the device-scheduled step (``capturable``'s) as one ``torch.compile``d graph: the
            first step compiles (tens of seconds on CPU, cached on disk); where compilation fails it
            falls back to the multi-tensor step with a warning. ``None`` (default): the C kernel where
            it applies and ``foreach`` is not given, else the multi-tensor step; it never compiles.
            ``NEUMANN_OPTIMIZER_NATIVE=0`` turns the C kernel off.
        capturable: keep the schedule's counters and the finite check on the parameters' device, so
            ``step()`` reads nothing on the host and a CUDA graph can capture it (``torch.optim``'s
            name). It runs the device-scheduled step eagerly, one tensor at a time.
        total_steps: the run's length in steps, if known: warns (:class:`ScheduleWarning`) when the
            burn-in is more than a quarter of it (a short run would be mostly plain SGD).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float | Tensor | None = None,
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
        regularizer_schedule: str = "constant",
        nonfinite: str = "skip",
        evaluation: str = "exact",
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        total_steps: int | None = None,
    ) -> None:
        if isinstance(params, torch.nn.Module):
            raise TypeError(
                f"Neumann: params is a {type(params).__name__} module; pass model.parameters() "
                "(or model.named_parameters(), or a list of parameter groups)"
            )
        if steps_per_epoch is not None:
            check_int("steps_per_epoch", steps_per_epoch, 1)
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"Neumann: nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        for flag, value in (("foreach", foreach), ("fused", fused), ("capturable", capturable)):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"Neumann: {flag} must be None, True or False, got {value!r}")
        if fused and foreach:
            raise ValueError("Neumann: choose one of fused=True and foreach=True")
        given = dict(burn_in_steps=burn_in_steps, reset_steps=reset_steps, momentum_ramp_steps=momentum_ramp_steps)
        # step counts given in steps win over a group's own steps_per_epoch; derived ones do not
        self._explicit_steps = {k for k, v in given.items() if v is not None}
        for name, epochs in EPOCH_DEFAULTS.items():
            if given[name] is None and steps_per_epoch is not None:
                given[name] = epochs * steps_per_epoch
        defaults = dict(
            lr=lr,
            steps_per_epoch=steps_per_epoch,
            reset_growth=reset_growth,
            momentum=momentum,
            **given,
            cubic_weight=cubic_weight,
            repulsive_weight=repulsive_weight,
            ema_decay=ema_decay,
            weight_decay=weight_decay,
            regularizer_schedule=regularizer_schedule,
            nonfinite=nonfinite,
            evaluation=evaluation,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
        )
        validate_group(dict(defaults))
        self._fused_failed = False  # set when torch.compile failed: the fused path is off for good
        self._plain: dict[int, bool] = {}  # per group index: all parameters plain real tensors
        # per group index: the CPU kernel's carried norm (functional.neumann's ``carry``)
        self._carried: dict[int, dict[str, Any]] = {}
        # per group index: what the last applied step did (read through step_record())
        self._records: dict[int, tuple[Any, ...] | None] = {}
        # per group index: its counters as device tensors, once a step kept them there (torch.compile,
        # fused=True off the CPU kernel, capturable=True)
        self._sched: dict[int, dict[str, Tensor]] = {}
        # per group index: device-scheduled steps outside torch.compile since its host and device
        # counters last agreed (missing: not known to agree, as after steps traced by dynamo)
        self._unsynced: dict[int, int] = {}
        self._total_steps: int | None = None  # the run length last checked by set_total_steps
        super().__init__(params, defaults)
        if total_steps is not None:
            self.set_total_steps(total_steps)

    def set_total_steps(self, total_steps: int) -> None:
        """Say how many steps the run will take (the ``total_steps`` argument; the Lightning and HF
        callbacks call it with the trainer's count): a :class:`ScheduleWarning` says so when a group's
        burn-in is more than a quarter of them. Nothing else uses it."""
        check_int("total_steps", total_steps, 1)
        if self._total_steps != total_steps:  # (once per length: callbacks may repeat it)
            self._total_steps = total_steps
            check_run_length(self.param_groups, total_steps)

    # ------------------------------------------------------------------ groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; it may carry any hyperparameter, ``lr`` and the step counts (or its own
        ``steps_per_epoch``) included, where the optimizer was not given them."""
        if isinstance(param_group, dict):
            resolve_group(param_group, len(self.param_groups), self.defaults, getattr(self, "_explicit_steps", set()))
        super().add_param_group(param_group)
        if hasattr(self, "_plain"):
            self._plain.pop(len(self.param_groups) - 1, None)
        group = self.param_groups[-1]
        validate_group(group)
        split_momentum(group)
        upgrade_group(group)
        if not all(g["train_mode"] for g in self.param_groups):
            raise RuntimeError("Neumann: call optimizer.train() before adding a parameter group")
        for p in group["params"]:
            if p.is_sparse:
                raise ValueError("Neumann does not support sparse parameters")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key, value in dict(_plain={}, _fused_failed=False, _sched={}, _total_steps=None).items():
            self.__dict__.setdefault(key, value)
        self.__dict__.update(_carried={}, _records={}, _unsynced={})  # (caches of the live tensors)
        for group in self.param_groups:  # (state dicts of earlier versions lack some keys)
            upgrade_group(group)

    def __repr__(self) -> str:
        self._sync_counters()
        return describe_groups(type(self).__name__, self.param_groups)

    def _param_name(self, gi: int, pi: int) -> str:
        group = self.param_groups[gi]
        names = group.get("param_names")
        p = group["params"][pi]
        label = f"'{names[pi]}'" if names else f"#{pi}"
        return f"parameter {label} of param group {gi} (shape {tuple(p.shape)})"

    # ------------------------------------------------------------------ the step
    def _gather(self) -> list[tuple[int, list[int], list[Tensor], list[Tensor]]]:
        """Per group: (group index, indices of params with grads, those params, their grads)."""
        out = []
        for gi, group in enumerate(self.param_groups):
            idx, ps, gs = [], [], []
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                check_gradient(p, partial(self._param_name, gi, pi))
                idx.append(pi)
                ps.append(p)
                gs.append(p.grad)
            out.append((gi, idx, ps, gs))
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one step to every parameter that has a gradient; return ``closure()``'s loss.

        A group none of whose parameters has a gradient is left as it is: its step counter and
        schedule (burn-in, momentum ramp, resets) advance only with its own gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.training:
            raise RuntimeError(
                "Neumann.step() called in evaluation mode: the parameters hold the evaluation "
                "weights w - mu m; call optimizer.train() before training again"
            )
        compiling = torch.compiler.is_compiling()
        entries = [entry for entry in self._gather() if entry[2]]
        # groups on their device schedule: traced by dynamo (plain groups), or fused=True off the CPU
        # kernel ("compiled"), or capturable=True ("eager"); the others on the host schedule
        device: dict[int, str] = {}
        for gi, _, ps, _ in entries:
            kind = "traced" if compiling and self._is_plain(gi) else None
            if kind or (not compiling and (kind := device_scheduled(self, gi, self._local(gi, ps)))):
                device[gi] = kind
        if not compiling and set(self._sched) - device.keys():
            self._sync_counters(skip=device.keys())  # host-scheduled steps after device ones: the host counters first
        # "skip" on the device schedule is a device flag (as fused Adam's found_inf); the rest are read here
        checked = [
            e
            for e in entries
            if self.param_groups[e[0]]["nonfinite"] != "ignore"
            and not (e[0] in device and self.param_groups[e[0]]["nonfinite"] == "skip")
        ]
        flags = finite_flags(checked, self.param_groups, self._local) if checked else []
        bad = [e for e, ok in zip(checked, flags, strict=True) if not ok]
        for entry in bad:  # raise before any group is written
            if self.param_groups[entry[0]]["nonfinite"] == "raise":
                raise_nonfinite(entry, self._param_name)
        skipped = {gi for gi, *_ in bad}
        for gi in sorted(skipped):
            count_skip(self.param_groups[gi], gi, len(self.param_groups))
        for gi, _, params, grads in entries:
            if device.get(gi) == "traced":  # the schedule on the device: no guard on a counter
                self._graph_step(gi, params, grads)
                continue
            if gi not in skipped:
                self._step_group(gi, params, grads, device=device.get(gi))
                self.param_groups[gi]["consecutive_skipped_steps"] = 0
            if self._unsynced.get(gi, 0) >= SYNC_EVERY:  # the occasional read of a device-scheduled group
                self._sync_counters(only=gi)
            if gi in self._sched and gi not in device and not compiling:  # keep the device counters current
                refresh(self._sched[gi], self.param_groups[gi])
                self._unsynced[gi] = 0
        return loss

    def _graph_step(self, gi: int, params: list[Tensor], grads: list[Tensor]) -> None:
        """A step traced by ``torch.compile``: the schedule as device tensors (see ``_graph_step``)."""
        group = self.param_groups[gi]
        lean = is_lean(group)
        ms, vs = buffers(self.state, params, lean)
        sched = schedule_of(self, gi, params)
        self._unsynced.pop(gi, None)  # the host counters no longer follow the device ones
        F.neumann(params, grads, ms, None if lean else vs, schedule=sched, constants=constants_of(group))
        # (nothing else of the optimizer is touched here: any Python value read or written in this
        # frame becomes a guard; the host learns of the step from the device schedule when it asks)

    def _sync_counters(self, skip: AbstractSet[int] = frozenset(), only: int | None = None) -> None:
        """Bring the host counters of groups stepped with the device schedule up to date (one read of
        the device per group), with the skip warnings those steps owe (``skip``: left for later)."""
        if not torch.compiler.is_compiling():
            sync_counters(self, skip, only)

    def _step_group(self, gi: int, params: list[Tensor], grads: list[Tensor], device: str | None = None) -> None:
        """One step of group ``gi``, on the host schedule or (``device``: ``"compiled"`` or
        ``"eager"``) the device one."""
        group = self.param_groups[gi]
        if group["momentum_bounds"] is not None and scheduler_wrote_momentum(group):
            warn_scheduler_momentum(group, gi, len(self.param_groups))
            group["momentum_bounds"] = None  # a scheduler took over the momentum, for good
        fac = factors(group["step"], group["next_reset"], group)
        lean = is_lean(group)
        ms, vs = buffers(self.state, params, lean)
        vs_ = None if lean else vs
        lr = group["lr"] if device else float(group["lr"])  # (a tensor lr stays one on the device step)
        sq: Any = None
        weights = None
        if device:
            sq = device_update(self, gi, params, grads, ms, vs_, device == "compiled")
            sq = None if lean else sq
        else:
            weights = regularizer_weights(group) if fac.phase is Phase.NEUMANN and not lean else None
            sq = update_group(self, gi, fac, lr, weights, params, grads, ms, vs_)
        self._records[gi] = (fac, lr, sq, weights, lean)
        group.update(advance({k: group[k] for k in COUNTER_KEYS}, fac.is_reset, True, group["reset_growth"]))
        if not fac.in_burn:
            group["last_momentum"] = fac.mu
        if group["momentum_bounds"] is not None:  # following the ramp: report the mu used
            group["momentum"] = group["last_momentum"]

    def _is_plain(self, gi: int) -> bool:
        """All parameters of group ``gi`` are plain real tensors (no DTensor, no complex); cached."""
        plain = self._plain.get(gi)
        if plain is None:
            plain = self._plain[gi] = not any(is_dtensor(p) or p.is_complex() for p in self.param_groups[gi]["params"])
        return plain

    def _local(self, gi: int, ts: list[Tensor]) -> list[Tensor]:
        """The real local tensors the kernels work on: ``ts`` itself for a plain group."""
        return ts if self._is_plain(gi) else [_real(local_tensor(t)) for t in ts]

    def step_record(self, group: int = 0) -> dict[str, Any] | None:
        """What the last applied step of param group ``group`` did, as plain Python numbers
        (``None`` before its first step). Reading it synchronises with the device once.

        Keys: ``step`` (s), ``phase`` (``"burn_in"``, ``"reset"`` or ``"neumann"``), ``lr``,
        ``momentum`` (mu), ``distance`` (r = ||w - v|| over the group before the update; ``None``
        outside the regularized phase, and on the compiled path for sharded groups), ``cubic_weight``
        and ``repulsive_weight_total`` (alpha and beta as applied, schedules included),
        ``coefficient`` (c = alpha r - beta / r^3, so the regularizer's displacement is ``c x``),
        ``repulsive_force`` (beta / r^2, the norm of the repulsive term of ``d``) and
        ``cubic_force`` (alpha r^2), and ``lean`` (True where both regularizers were 0: the step
        kept no ``v`` and did not compute the norm, so ``distance`` and the forces are ``None``).
        Not saved in ``state_dict()``.
        """
        self._sync_counters()
        rec = self._records.get(group)
        if rec is None:
            return None
        plan, lr, sq, weights, lean = rec
        lr = float(lr)
        if weights is None:  # not needed by the step itself; as they stood at its learning rate
            weights = (0.0, 0.0) if lean else regularizer_weights({**self.param_groups[group], "lr": lr})
        return {**describe_step(self.param_groups[group]["step"], plan, lr, sq, *weights), "lean": lean}

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict after checking that it is a Neumann state of the same model."""
        check_state_dict(self, state_dict)
        state_dict = without_shapes(state_dict)
        saved_v = saved_averages(self, state_dict)
        super().load_state_dict(state_dict)  # (torch casts every state tensor to its parameter's dtype ...)
        for p, v in saved_v:  # ... v of a low-precision parameter stays float32, as saved
            self.state[p]["v"] = v.to(device=p.device, dtype=v_dtype(p))
        self._carried.clear()
        for gi, sched in self._sched.items():  # a compiled step goes on from the loaded counters
            refresh(sched, self.param_groups[gi])

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state dict, with the counters of compiled steps brought to the host."""
        self._sync_counters()
        return with_shapes(super().state_dict(), self.param_groups)
