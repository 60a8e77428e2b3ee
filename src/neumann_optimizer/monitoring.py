"""Watch Neumann train: its own quantities as scalars for the loggers people read.

Every ``every_n_steps`` steps (the optimizer's own step count, saved in its state dict, so the
logs of a resumed run continue where its checkpoint stopped), a step post-hook turns each parameter
group's :meth:`~neumann_optimizer.Neumann.step_record` into plain floats (one device
synchronisation on that step, none on the others) and hands them to a sink:

- :func:`log_step_records` writes them to a ``torch.utils.tensorboard.SummaryWriter`` (or anything
  with ``add_scalar(tag, value, step)``), for hand-written loops;
- ``integrations.lightning.NeumannMonitor`` sends them to every Lightning logger;
- ``integrations.transformers.NeumannLogCallback`` sends them through ``Trainer.log``.

The scalars, under ``neumann/`` (``neumann/group{i}/`` when there are several groups):
``phase`` (0 burn-in, 1 reset, 2 Neumann), ``lr``, ``momentum`` (the mu the step used),
``distance`` (||w - v||), ``grad_norm`` (||g|| of the gradients the step saw), ``cubic_force``
(alpha ||w - v||^2) and ``repulsive_force`` (beta / ||w - v||^2), the two forces over the gradient
norm (``cubic_to_grad``, ``repulsive_to_grad``: above 1 the regularizer outweighs the gradient),
and ``skipped_steps`` (non-finite gradients so far). A quantity the step did not compute (the
distance during burn-in) is left out rather than logged as 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["PHASES", "StepLog", "log_step_records", "step_metrics", "steps_taken"]

PHASES = {"burn_in": 0.0, "reset": 1.0, "neumann": 2.0}
Sink = Callable[[dict[str, float], int], None]


def _grad_norm(group: dict[str, Any]) -> float | None:
    grads = [p.grad for p in group["params"] if p.grad is not None]
    if not grads:
        return None
    return float(torch.nn.utils.get_total_norm(grads, foreach=None))


def step_metrics(optimizer: Any, prefix: str = "neumann") -> dict[str, float]:
    """The last applied step of every group of a Neumann ``optimizer`` as ``{name: float}``.

    Reads the gradients still held in ``.grad`` for ``grad_norm`` (call it after ``step()`` and
    before ``zero_grad()``, as the post-hook of :class:`StepLog` does); empty before the first step.
    """
    out: dict[str, float] = {}
    groups = optimizer.param_groups
    for gi, group in enumerate(groups):
        rec = optimizer.step_record(gi)
        if rec is None:
            continue
        head = prefix if len(groups) == 1 else f"{prefix}/group{gi}"
        values: dict[str, Any] = {
            "phase": PHASES[rec["phase"]],
            "lr": rec["lr"],
            "momentum": rec["momentum"],
            "distance": rec["distance"],
            "cubic_force": rec["cubic_force"],
            "repulsive_force": rec["repulsive_force"],
            "skipped_steps": group["skipped_steps"],
        }
        g = _grad_norm(group)
        values["grad_norm"] = g
        if g is not None and g > 0:
            for force in ("cubic_force", "repulsive_force"):
                if rec[force] is not None:
                    values[force.replace("_force", "_to_grad")] = rec[force] / g
        for key, value in values.items():
            if value is not None and math.isfinite(float(value)):
                out[f"{head}/{key}"] = float(value)
    return out


def steps_taken(optimizer: Any) -> int:
    """The optimizer's own count of its steps, the logs' x-axis: over its groups, the most steps a
    group applied or skipped. It is saved in ``state_dict()``, so after ``load_state_dict`` the
    logs go on from where the checkpoint stopped."""
    return max((g["step"] + g["skipped_steps"] for g in optimizer.param_groups), default=0)


class StepLog:
    """A step post-hook on ``optimizer`` that, on every step whose count (:func:`steps_taken`, the
    optimizer's own, so it continues after a resume) is a multiple of ``every_n_steps``, computes
    :func:`step_metrics` and passes them, with that count, to ``sink``; the last ones stay in
    :attr:`latest`. :meth:`remove` takes the hook off. Nothing runs on the other steps but a
    comparison."""

    def __init__(self, optimizer: Any, every_n_steps: int = 50, sink: Sink | None = None, prefix: str = "neumann"):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        if not hasattr(optimizer, "step_record"):
            raise TypeError(f"StepLog needs a Neumann optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.every_n_steps = every_n_steps
        self.sink = sink
        self.prefix = prefix
        self.latest: tuple[int, dict[str, float]] | None = None
        self._taken = 0  # the step count of the metrics take() handed out last
        self._handle = optimizer.register_step_post_hook(self._hook)

    def _hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        step = steps_taken(optimizer)
        if step % self.every_n_steps or (self.latest is not None and self.latest[0] == step):
            return
        metrics = step_metrics(optimizer, self.prefix)
        if not metrics:
            return
        self.latest = (step, metrics)
        if self.sink is not None:
            self.sink(metrics, step)

    def take(self) -> dict[str, float] | None:
        """The latest metrics if :meth:`take` has not returned them yet, else ``None``: for a
        framework that emits them at its own logging point."""
        if self.latest is None or self.latest[0] == self._taken:
            return None
        self._taken = self.latest[0]
        return dict(self.latest[1])

    def remove(self) -> None:
        self._handle.remove()


def log_step_records(optimizer: Any, writer: Any, every_n_steps: int = 50, prefix: str = "neumann") -> StepLog:
    """Write :func:`step_metrics` to ``writer`` (a ``SummaryWriter``: ``add_scalar(tag, value,
    step)``) every ``every_n_steps`` steps, the optimizer's own step count (:func:`steps_taken`) as
    the step, so a resumed run's logs continue where the checkpoint stopped.

    .. code-block:: python

        writer = torch.utils.tensorboard.SummaryWriter("runs/neumann")
        log = log_step_records(opt, writer, every_n_steps=50)
        ...  # train as usual
        log.remove()
    """

    if not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(
            f"log_step_records: writer must have add_scalar(tag, value, step) (a SummaryWriter), got {writer!r}"
        )

    def sink(metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, step)

    return StepLog(optimizer, every_n_steps, sink, prefix)
