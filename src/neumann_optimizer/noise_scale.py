"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish, Kaplan, Amodei et al., "An
Empirical Model of Large-Batch Training", 2018): the batch size past which a larger batch stops
buying proportionally fewer steps.

From the squared norms of two gradient estimates of the same parameters, one over a batch of
``b_small`` examples and one over ``b_large``, their Appendix A gives unbiased estimators, since
``E |G_B|^2 = |G|^2 + tr(Sigma) / B`` for a mean over ``B`` independent examples:

.. code-block:: text

    |G|^2     ~ (b_large |G_large|^2 - b_small |G_small|^2) / (b_large - b_small)
    tr(Sigma) ~ (|G_small|^2 - |G_large|^2) / (1 / b_small - 1 / b_large)

Each is unbiased; their ratio is not, and one step's estimates are noisy (the |G|^2 estimate can
even be negative), so :class:`NoiseScaleAccumulator` averages numerator and denominator
separately over steps and divides the averages, as the paper recommends.

In data-parallel training the two batch sizes come for free: each rank's local gradient (before
the all-reduce) is a mean over the local batch, the all-reduced one over the global batch.
:func:`register_ddp_noise_scale_hook` reads both around DDP's own all-reduce (a DDP comm hook:
one extra read of each gradient bucket before it is sent and after it comes back, and one scalar
all-reduce each time the estimate is read).
"""

# No ``from __future__ import annotations``: DDP checks the comm hook's annotations as objects.
import math
import threading
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

_GradBucket: Any = getattr(dist, "GradBucket", Any)  # absent from torch builds without distributed

__all__ = [
    "NoiseScale",
    "NoiseScaleAccumulator",
    "gradient_noise_scale",
    "register_ddp_noise_scale_hook",
]


class NoiseScale(NamedTuple):
    noise_scale: float  # B_simple = trace_sigma / grad_sq_norm (nan unless grad_sq_norm > 0)
    trace_sigma: float  # tr(Sigma): the per-example gradient covariance's trace
    grad_sq_norm: float  # |G|^2: the squared norm of the true (full-batch) gradient


def _check_batches(small_batch: float, large_batch: float) -> None:
    if not (0 < small_batch < large_batch) or not math.isfinite(large_batch):
        raise ValueError(f"need 0 < small_batch < large_batch, got {small_batch} and {large_batch}")


def _estimates(small_sq: Any, large_sq: Any, b_small: float, b_large: float) -> tuple[Any, Any]:
    grad_sq = (b_large * large_sq - b_small * small_sq) / (b_large - b_small)
    trace = (small_sq - large_sq) / (1.0 / b_small - 1.0 / b_large)
    return trace, grad_sq


def _ratio(trace: float, grad_sq: float) -> float:
    return trace / grad_sq if grad_sq > 0 else math.nan


def gradient_noise_scale(
    small_sq_norm: float | Tensor, large_sq_norm: float | Tensor, small_batch: float, large_batch: float
) -> NoiseScale:
    """One step's estimates from ``|G_small|^2`` and ``|G_large|^2``, the squared norms of the
    mean gradient over ``small_batch`` and over ``large_batch`` examples (see the module doc).

    ``noise_scale`` is the ratio of the two unbiased estimates: noisy and biased for one step;
    average over steps with :class:`NoiseScaleAccumulator`."""
    _check_batches(small_batch, large_batch)
    trace, grad_sq = _estimates(float(small_sq_norm), float(large_sq_norm), small_batch, large_batch)
    return NoiseScale(_ratio(trace, grad_sq), trace, grad_sq)


class NoiseScaleAccumulator:
    """Averages the two unbiased estimates over steps, separately, and divides the averages.

    Args:
        small_batch, large_batch: the two batch sizes of every :meth:`update`.
        decay: ``None`` for plain means since the last :meth:`reset`; a number in (0, 1) for
            exponential moving averages with that decay (bias-corrected), to follow the noise
            scale as training goes on.

    :meth:`update` takes floats or 0-d tensors; tensors stay on their device (no host
    synchronisation) until :attr:`value` is read.
    """

    def __init__(self, small_batch: float, large_batch: float, decay: float | None = None) -> None:
        _check_batches(small_batch, large_batch)
        if decay is not None and not (0.0 < decay < 1.0):
            raise ValueError(f"decay must be None or in (0, 1), got {decay}")
        self.small_batch, self.large_batch, self.decay = small_batch, large_batch, decay
        self.reset()

    def reset(self) -> None:
        self._trace: Any = 0.0
        self._grad_sq: Any = 0.0
        self._weight = 0.0  # sum of the weights given to the steps so far
        self.steps = 0

    def update(self, small_sq_norm: float | Tensor, large_sq_norm: float | Tensor) -> None:
        trace, grad_sq = _estimates(small_sq_norm, large_sq_norm, self.small_batch, self.large_batch)
        keep = 1.0 if self.decay is None else self.decay
        self._trace = keep * self._trace + trace
        self._grad_sq = keep * self._grad_sq + grad_sq
        self._weight = keep * self._weight + 1.0
        self.steps += 1

    @property
    def value(self) -> NoiseScale:
        """The averaged estimates (``nan`` before the first update)."""
        if self.steps == 0:
            return NoiseScale(math.nan, math.nan, math.nan)
        trace = float(self._trace) / self._weight
        grad_sq = float(self._grad_sq) / self._weight
        return NoiseScale(_ratio(trace, grad_sq), trace, grad_sq)


class DDPNoiseScaleState:
    """What :func:`register_ddp_noise_scale_hook` accumulates; read it with :meth:`value` (a
    collective: call it on every rank) and start afresh with :meth:`reset`."""

    def __init__(self, local_batch: int, process_group: Any = None) -> None:
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        if self.world_size < 2:
            raise ValueError("the DDP noise-scale hook needs at least 2 ranks (two batch sizes)")
        self.local_batch = local_batch
        # the all-reduce callbacks of different buckets may run at once on communication threads:
        # every accumulation holds this lock (a lost update once made the estimate 30 instead of 17)
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.local_sq: Tensor | None = None  # this rank: sum over steps of |G_local|^2
        self.global_sq: Tensor | None = None  # sum over steps of |G_global|^2 (the same on every rank)
        self.steps = 0

    def _add(self, name: str, value: Tensor, step_done: bool = False) -> None:
        with self._lock:
            current = getattr(self, name)
            setattr(self, name, value if current is None else current + value)
            if step_done:
                self.steps += 1

    def value(self) -> NoiseScale:
        """The noise scale from the steps since the last reset: the small batch is each rank's
        local batch, its squared norm averaged over ranks (one scalar all-reduce), the large
        batch the global one."""
        if self.steps == 0 or self.local_sq is None or self.global_sq is None:
            return NoiseScale(math.nan, math.nan, math.nan)
        local = self.local_sq.clone()
        dist.all_reduce(local, group=self.process_group)
        small = float(local) / self.world_size / self.steps
        large = float(self.global_sq) / self.steps
        b = self.local_batch
        trace, grad_sq = _estimates(small, large, b, b * self.world_size)
        return NoiseScale(_ratio(trace, grad_sq), trace, grad_sq)


def _noise_scale_hook(state: DDPNoiseScaleState, bucket: _GradBucket) -> torch.futures.Future[torch.Tensor]:
    buf = bucket.buffer()
    state._add("local_sq", buf.detach().double().square().sum())  # the local gradient, before sending
    buf.div_(state.world_size)  # DDP's default: the all-reduced sum of local means / world = global mean
    fut = dist.all_reduce(buf, group=state.process_group, async_op=True).get_future()

    def received(fut: torch.futures.Future[Any]) -> torch.Tensor:
        out = fut.value()[0]
        state._add("global_sq", out.detach().double().square().sum(), step_done=bucket.is_last())
        return out

    return fut.then(received)


def register_ddp_noise_scale_hook(ddp_model: Any, local_batch: int, process_group: Any = None) -> DDPNoiseScaleState:
    """Register a DDP communication hook that all-reduces the gradients as DDP's default does
    (mean over ranks) and sums, on the way, the squared norms of each rank's local gradient and of
    the all-reduced one: the gradient noise scale at no extra backward.

    .. code-block:: python

        ddp = DistributedDataParallel(model)
        noise = register_ddp_noise_scale_hook(ddp, local_batch=per_rank_batch_size)
        ...  # train; every N steps, on every rank:
        b_simple, trace_sigma, grad_sq = noise.value()
        noise.reset()

    ``local_batch`` is the number of examples each rank's gradient averages over (equal on all
    ranks). With gradient accumulation under ``no_sync()``, the hook sees the accumulated gradient
    once, at the step that communicates: give the examples of all accumulated micro-batches and
    average the loss over them (divide each micro-batch's loss by their number). A DDP model takes
    one comm hook: this one replaces the default all-reduce (compression hooks cannot be combined
    with it).

    Teardown: the hook's callbacks are Python objects held by gloo's work items, so the process
    group must be destroyed while the interpreter is alive (``dist.destroy_process_group()`` at the
    end of the script). On torch 2.13, importing ``torch._dynamo`` after the group exists (DDP's
    constructor does) keeps the group alive past ``destroy_process_group()``, and gloo's threads
    then meet interpreter teardown, which can abort the process (SIGABRT, "terminate called without
    an active exception"). Import it before ``init_process_group``
    (``importlib.import_module("torch._dynamo")``), as ``examples/train_large_batch.py`` does.
    """
    state = DDPNoiseScaleState(local_batch, process_group)
    ddp_model.register_comm_hook(state, _noise_scale_hook)
    return state
