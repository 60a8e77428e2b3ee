"""One training run of the reproduction: a config in, per-epoch metrics out.

A run config is a flat dict (hashed for the cache)::

    task, model, optimizer, lr, batch, epochs, seed, warmup_epochs, schedule,
    optionally width (of the model, see ``tasks.make_model``), clip (a global gradient-norm
    threshold; the run reports the fraction of steps clipped), bn_variants (Neumann with a
    BatchNorm model: also the test error at the training weights w and at w - mu m without
    recomputed BatchNorm statistics),
    and for Neumann: cubic_weight, repulsive_weight, burn_in_epochs, regularizer_schedule, momentum
    (a constant mu, no ramp), resets (False: none), eval_at_w (also the errors at the training
    weights w: ``val_error_at_w``, ``test_error_at_w``)

Every optimizer uses the same schedule family, ``schedule`` (absent: ``"cosine"``):

- ``"cosine"``: linear warmup over ``warmup_epochs`` (the baselines'; Neumann's burn-in and momentum
  ramp are its own warmup, so its configs have ``warmup_epochs=0`` unless a study replaces the
  burn-in by the warmup), then cosine decay to 0 at the end.
- ``"paper"``: the paper's schedule (its section 4: a linear ramp over the first epochs, then the
  rate multiplied by 0.3 every 40 of its ~200 epochs), scaled to the budget: a linear ramp over
  ``warmup_epochs`` for every optimizer, Neumann included (its burn-in runs during the ramp, as in
  the paper's synchronous runs), then x0.3 every ``epochs / 5`` epochs (10 of 50), counted from
  the start of training.
Neumann is evaluated with its evaluation weights ``w - mu m`` and, for BatchNorm models, with
BatchNorm statistics recomputed for those weights (``torch.optim.swa_utils.update_bn``).
"""

from __future__ import annotations

import copy
import functools
import math
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from neumann_optimizer import Neumann
from neumann_optimizer.optimizer import DivergedWarning

from .tasks import Dataset, has_batchnorm, make_model

PAPER_REPULSIVE_WEIGHT = 1e-5  # beta / n of the paper's Table 1
PAPER_CUBIC_WEIGHT = 1e-7  # alpha of the paper's Table 1
OPTIMIZERS = ("neumann", "neumann-adaptive", "sgd", "adam", "adamw", "rmsprop", "rmsprop-inception", "lars", "lamb")


SCHEDULES = ("cosine", "paper")
NO_RESETS = 2**62  # a first reset interval no run reaches
PAPER_DECAY = 0.3  # the paper's staircase factor
PAPER_DECAYS_PER_RUN = 5  # the paper: every 40 epochs of ~200


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup for ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


NEUMANN_BURN_IN_EPOCHS, NEUMANN_MU_MAX = 5, 0.9  # the library's defaults (tau: one epoch)


def neumann_matched_factor(step: int, steps_per_epoch: int, burn_in_epochs: float = NEUMANN_BURN_IN_EPOCHS) -> float:
    """A warm-up for momentum-0.9 SGD that follows Neumann's effective step size ``lr / (1 - mu_t)``
    under the library's defaults, as a share of SGD's own ``lr / (1 - 0.9)``: 0.1 through the 5-epoch
    burn-in (plain SGD, ``mu = 0``), then ``(1 - 0.9) (1 + t / tau) = 0.1 (1 + t / tau)`` while
    Neumann's momentum ramps (``mu_t = 1 - 1 / (1 + t / tau)``, ``tau`` one epoch), reaching 1 when
    ``mu_t`` reaches 0.9, 9 epochs later: 14 epochs in all."""
    t = step + 1 - int(burn_in_epochs * steps_per_epoch)
    if t <= 0:
        return 1.0 - NEUMANN_MU_MAX
    return min(1.0, (1.0 - NEUMANN_MU_MAX) * (1.0 + t / steps_per_epoch))


def paper_lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear ramp for ``warmup`` steps, times 0.3 every ``total / 5`` steps (from step 0)."""
    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    interval = max(1, total // PAPER_DECAYS_PER_RUN)
    return ramp * PAPER_DECAY ** min(step // interval, PAPER_DECAYS_PER_RUN - 1)


def schedule_factor(cfg: dict[str, Any], total: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning-rate factor of a run's step ``k`` (``LambdaLR``'s lambda)."""
    schedule = cfg.get("schedule", "cosine")
    warmup = int(cfg.get("warmup_epochs", 0) * steps_per_epoch)
    if schedule == "paper":
        return functools.partial(paper_lr_factor, total=total, warmup=warmup)
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")
    return functools.partial(lr_factor, total=total, warmup=warmup)


def make_optimizer(cfg: dict[str, Any], model: nn.Module, steps_per_epoch: int) -> torch.optim.Optimizer:
    name, lr = cfg["optimizer"], cfg["lr"]
    params = model.parameters()
    if name in ("neumann", "neumann-adaptive"):
        # a config without repulsive_weight (cubic_weight) is the paper's Table 1, as every run
        # committed before the library's default left it: those results stay what they say
        kw: dict[str, Any] = dict(repulsive_weight=PAPER_REPULSIVE_WEIGHT, cubic_weight=PAPER_CUBIC_WEIGHT)
        for key in ("cubic_weight", "repulsive_weight", "regularizer_schedule"):
            if cfg.get(key) is not None:
                kw[key] = cfg[key]
        if cfg.get("burn_in_epochs") is not None:
            kw["burn_in_steps"] = int(cfg["burn_in_epochs"] * steps_per_epoch)
        if cfg.get("momentum") is not None:
            kw["momentum"] = float(cfg["momentum"])
        if cfg.get("resets") is False:
            kw["reset_steps"] = NO_RESETS
        return Neumann(params, lr=lr, steps_per_epoch=steps_per_epoch, **kw)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)  # torch's defaults (weight_decay 0.01)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-8)
    if name == "rmsprop-inception":  # the paper's baseline: Inception's RMSprop (Szegedy et al. 2016)
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, momentum=0.9, eps=1.0)
    if name in ("lars", "lamb"):
        # the large-batch baselines come from a well-kept collection, configured as its docs say
        from pytorch_optimizer import LARS, Lamb

        if name == "lars":  # momentum 0.9, trust coefficient 1e-3; biases and norms plain SGD
            return LARS(params, lr=lr)
        return Lamb(params, lr=lr)  # betas (0.9, 0.999), eps 1e-6, no weight decay
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and error rate (in %) of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, wrong = 0.0, 0
    for i in range(0, len(x), 4096):
        xb, yb = x[i : i + 4096].to(device), y[i : i + 4096].to(device)
        out = model(xb)
        loss_sum += nn.functional.cross_entropy(out, yb, reduction="sum").item()
        wrong += (out.argmax(1) != yb).sum().item()
    model.train(was_training)
    return loss_sum / len(x), 100.0 * wrong / len(x)


class _RegularizerMonitor:
    """Reads the optimizer's own record of each step (:meth:`Neumann.step_record`): the fraction of
    regularized steps whose repulsive force ``beta/r^2`` exceeds the mini-batch gradient norm, the
    cubic force ``alpha r^2`` as a share of that norm, and a per-epoch trace of ``r = ||w - v||``,
    the learning rate and that fraction."""

    def __init__(self) -> None:
        self.wins: list[tuple[int, bool]] = []  # (step index, repulsive force > ||g||)
        self.cubic_shares: list[float] = []  # cubic force / ||g|| of each regularized step
        self._epoch: list[tuple[float, bool]] = []  # (r, repulsive > ||g||) of this epoch's steps

    @torch.no_grad()
    def observe(self, opt: Neumann) -> None:
        """After ``opt.step()``, with the step's gradients still in place."""
        rec = opt.step_record(0)
        if rec is None or rec["phase"] != "neumann" or rec["distance"] is None:
            return
        ps = [p for p in opt.param_groups[0]["params"] if p.grad is not None]
        g = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ps))
        win = rec["repulsive_force"] > g
        self.wins.append((rec["step"], win))
        if g > 0:
            self.cubic_shares.append(rec["cubic_force"] / g)
        self._epoch.append((rec["distance"], win))

    def end_epoch(self, opt: Neumann) -> dict[str, float | None]:
        """The trace entry of the epoch that just ended (mean r and fraction over its regularized steps)."""
        steps, self._epoch = self._epoch, []
        return dict(
            lr=float(opt.param_groups[0]["lr"]),
            distance=statistics.fmean(r for r, _ in steps) if steps else None,
            repulsive_exceeds_grad=statistics.fmean(float(w) for _, w in steps) if steps else None,
        )

    def fractions(self, total_steps: int) -> tuple[float, float]:
        """Over all regularized steps, and over those in the last 10% of training."""
        last = [w for s, w in self.wins if s > 0.9 * total_steps]
        frac = lambda ws: sum(ws) / len(ws) if ws else 0.0  # noqa: E731
        return frac([w for _, w in self.wins]), frac(last)


def _batch_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(x), y)


def run(cfg: dict[str, Any], data: Dataset, device: torch.device) -> dict[str, Any]:
    """Train one config; return the config, per-epoch metrics (per evaluation point for a config
    with a ``steps`` budget) and a divergence flag."""
    with warnings.catch_warnings():
        # a diverging Neumann run skips every step from then on, each with a warning; the run
        # is recorded as diverged at the end of that epoch, so the warnings say nothing more
        warnings.filterwarnings("ignore", message="Neumann: non-finite gradient", category=RuntimeWarning)
        warnings.filterwarnings("ignore", category=DivergedWarning)
        return _run_steps(cfg, data, device) if "steps" in cfg else _run(cfg, data, device)


NOISE_SMALL, NOISE_LARGE, NOISE_REPEATS = 32, 2048, 8  # batch sizes of the noise-scale probes


def _sq_grad_norm(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None)


def _noise_probe(model: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[float, float]:
    """(tr(Sigma), |G|^2) at the current weights, McCandlish et al.'s unbiased estimators from
    ``NOISE_REPEATS`` small and one large random batch of the training set."""
    from neumann_optimizer.noise_scale import gradient_noise_scale

    small = statistics.fmean(
        _sq_grad_norm(model, *(t[idx] for t in (x, y)))
        for idx in (torch.randint(len(x), (NOISE_SMALL,), generator=gen) for _ in range(NOISE_REPEATS))
    )
    idx = torch.randperm(len(x), generator=gen)[:NOISE_LARGE]
    large = _sq_grad_norm(model, x[idx], y[idx])
    est = gradient_noise_scale(small, large, NOISE_SMALL, min(NOISE_LARGE, len(x)))
    model.zero_grad(set_to_none=True)
    return est.trace_sigma, est.grad_sq_norm


def _times(f: Callable[[int], float], g: Callable[[int], float], step: int) -> float:
    return f(step) * g(step)


def _run_steps(cfg: dict[str, Any], data: Dataset, device: torch.device) -> dict[str, Any]:
    """A run with a budget of ``cfg["steps"]`` optimizer steps (critical-batch study): the learning
    rate warms up linearly over ``warmup_frac`` of the budget (the baselines' configs have it;
    Neumann's burn-in is its own warmup, unless a config gives it one too), or with ``warmup``
    ``"neumann"`` by :func:`neumann_matched_factor`, and decays to 0 by
    cosine at the budget's end; validation and test errors are taken at ``evals`` evenly spaced
    points (Neumann at its evaluation weights). With ``noise_scale``, each point also
    estimates tr(Sigma) and |G|^2 at the training weights (``_noise_probe``)."""
    torch.manual_seed(cfg["seed"])
    model = make_model(cfg["model"], data, cfg.get("width")).to(device)
    n = len(data.x_train)
    batch = cfg["batch"]
    steps_per_epoch = max(1, n // batch)
    total = int(cfg["steps"])
    opt = make_optimizer(cfg, model, steps_per_epoch)
    warmup = int(cfg.get("warmup_frac", 0.0) * total)
    factor = functools.partial(lr_factor, total=total, warmup=warmup)
    if cfg.get("warmup") == "neumann":  # cosine decay times the warm-up matched to Neumann's schedule
        burn = cfg.get("matched_burn_in_epochs", NEUMANN_BURN_IN_EPOCHS)  # (a quick run's is shorter)
        matched = functools.partial(neumann_matched_factor, steps_per_epoch=steps_per_epoch, burn_in_epochs=burn)
        factor = functools.partial(_times, factor, matched)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    evals = max(1, int(cfg.get("evals", 16)))
    points = sorted({max(1, round(total * k / evals)) for k in range(1, evals + 1)})
    gen = torch.Generator().manual_seed(cfg["seed"])
    probe_gen = torch.Generator().manual_seed(10_000 + cfg["seed"])
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    bn_batches = [x_train[i : i + 1024] for i in range(0, min(n, 8192), 1024)]
    history: list[dict[str, float]] = []
    diverged = False
    t0 = time.perf_counter()
    step, loss_sum, seen = 0, 0.0, 0
    perm = torch.randperm(n, generator=gen).to(device)
    k = 0
    model.train()
    while step < total and not diverged:
        if (k + 1) * batch > n:  # a new epoch: a new permutation (the last partial batch dropped)
            perm, k = torch.randperm(n, generator=gen).to(device), 0
        idx = perm[k * batch : (k + 1) * batch]
        k += 1
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        loss_sum, seen = loss_sum + loss.item(), seen + 1
        if step not in points:
            continue
        train_loss, loss_sum, seen = loss_sum / seen, 0.0, 0
        entry: dict[str, Any] = dict(step=step, train_loss=train_loss)
        if cfg.get("noise_scale"):
            entry["trace_sigma"], entry["grad_sq"] = _noise_probe(model, x_train, y_train, probe_gen)
        entry.update(_evaluate_run(model, opt, data, device, bn_batches), **_at_w(cfg, model, data, device))
        diverged = not (math.isfinite(train_loss) and math.isfinite(entry["val_loss"]))
        history.append(entry)
    return _result(cfg, history, diverged, t0, n, steps_per_epoch, step, opt)


def _evaluate_run(
    model: nn.Module, opt: torch.optim.Optimizer, data: Dataset, device: torch.device, bn_batches: list[Tensor]
) -> dict[str, float]:
    """Validation and test loss and error (%) of a run at this point: Neumann at its evaluation
    weights ``w - mu m``, with BatchNorm statistics recomputed for them from ``bn_batches`` (and
    the training-time ones put back afterwards), every other optimizer as it stands."""
    neumann = opt if isinstance(opt, Neumann) else None
    saved = None
    if neumann is not None:
        neumann.eval()
        if has_batchnorm(model):
            saved = copy.deepcopy({k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k})
            torch.optim.swa_utils.update_bn(bn_batches, model)
    out: dict[str, float] = {}
    out["val_loss"], out["val_error"] = evaluate(model, data.x_val, data.y_val, device)
    out["test_loss"], out["test_error"] = evaluate(model, data.x_test, data.y_test, device)
    if neumann is not None:
        if saved is not None:
            model.load_state_dict(saved, strict=False)
        neumann.train()
    return out


def _at_w(cfg: dict[str, Any], model: nn.Module, data: Dataset, device: torch.device) -> dict[str, float]:
    """With ``eval_at_w``: the validation and test errors at the training weights w (a model
    without BatchNorm; between steps the model holds w)."""
    if not cfg.get("eval_at_w"):
        return {}
    return dict(
        val_error_at_w=evaluate(model, data.x_val, data.y_val, device)[1],
        test_error_at_w=evaluate(model, data.x_test, data.y_test, device)[1],
    )


def _result(
    cfg: dict[str, Any],
    history: list[dict[str, Any]],
    diverged: bool,
    t0: float,
    n: int,
    steps_per_epoch: int,
    steps: int,
    opt: torch.optim.Optimizer,
) -> dict[str, Any]:
    """What a run returns (and the cache keeps)."""
    out: dict[str, Any] = dict(
        config=cfg,
        history=history,
        diverged=diverged,
        seconds=time.perf_counter() - t0,
        train_size=n,
        steps_per_epoch=steps_per_epoch,
        steps=steps,
    )
    if isinstance(opt, Neumann):
        out["neumann_steps"] = max(0, steps - opt.param_groups[0]["burn_in_steps"])
    return out


def _run(cfg: dict[str, Any], data: Dataset, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(cfg["seed"])
    model = make_model(cfg["model"], data, cfg.get("width")).to(device)
    n = len(data.x_train)
    batch = cfg["batch"]
    steps_per_epoch = max(1, n // batch)
    total = steps_per_epoch * cfg["epochs"]
    opt = make_optimizer(cfg, model, steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule_factor(cfg, total, steps_per_epoch))
    is_neumann = isinstance(opt, Neumann)
    bn = has_batchnorm(model)
    monitor = _RegularizerMonitor() if (is_neumann and cfg.get("track_regularizer")) else None
    adaptive = None
    if cfg["optimizer"] == "neumann-adaptive":
        from .adaptive import AdaptiveMomentum

        adaptive = AdaptiveMomentum(opt, every=cfg.get("adaptive_every") or steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg["seed"])
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    bn_batches = [x_train[i : i + 1024] for i in range(0, min(n, 8192), 1024)]
    clip = cfg.get("clip")  # gradient clipping by global norm (None: off)
    clipped = 0
    bn_variants = bool(cfg.get("bn_variants")) and is_neumann and bn
    history: list[dict[str, float]] = []
    diverged = False
    t0 = time.perf_counter()
    for epoch in range(1, cfg["epochs"] + 1):
        model.train()
        perm = torch.randperm(n, generator=gen).to(device)
        loss_sum = 0.0
        for k in range(steps_per_epoch):
            idx = perm[k * batch : (k + 1) * batch]
            if adaptive is not None and opt.param_groups[0]["step"] >= opt.param_groups[0]["burn_in_steps"]:
                adaptive.update(functools.partial(_batch_loss, model, x_train[idx], y_train[idx]))
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            if clip is not None:  # the paper's Section 4.4: a threshold active on most steps
                norm = float(nn.utils.clip_grad_norm_(model.parameters(), clip))
                clipped += norm > clip
            opt.step()
            if monitor is not None:
                monitor.observe(opt)  # type: ignore[arg-type]
            sched.step()
            loss_sum += loss.item()
        train_loss = loss_sum / steps_per_epoch
        if not math.isfinite(train_loss):
            diverged = True
        variants: dict[str, float] = {}
        if bn_variants:  # what a user would see without the switch, or without recomputing BN statistics
            variants["test_error_at_w"] = evaluate(model, data.x_test, data.y_test, device)[1]
            opt.eval()  # type: ignore[attr-defined]
            variants["test_error_no_bn_update"] = evaluate(model, data.x_test, data.y_test, device)[1]
            opt.train()  # type: ignore[attr-defined]
        entry: dict[str, Any] = dict(epoch=epoch, train_loss=train_loss)
        entry.update(_evaluate_run(model, opt, data, device, bn_batches), **variants, **_at_w(cfg, model, data, device))
        if not math.isfinite(entry["val_loss"]):
            diverged = True
        if monitor is not None:
            entry.update(monitor.end_epoch(opt))  # type: ignore[arg-type]
        history.append(entry)
        if diverged:
            break
    steps = steps_per_epoch * len(history)  # optimizer steps taken (fewer when a run diverged)
    out = _result(cfg, history, diverged, t0, n, steps_per_epoch, steps, opt)
    if clip is not None:
        out["clipped_fraction"] = clipped / max(1, steps)
    if adaptive is not None:
        out["adaptive_momentum"] = adaptive.history
    if monitor is not None:
        overall, last = monitor.fractions(total)
        out["repulsive_exceeds_grad_fraction"] = overall
        out["repulsive_exceeds_grad_fraction_last10"] = last
        if monitor.cubic_shares:
            out["cubic_share_median"] = statistics.median(monitor.cubic_shares)
    return out
