"""Hugging Face ``Trainer``: export the evaluation weights ``w - mu m`` when training ends.

.. code-block:: python

    from neumann_optimizer.integrations.transformers import EvaluationWeightsCallback

    trainer = Trainer(..., optimizers=(opt, scheduler), callbacks=[EvaluationWeightsCallback()])

The ``Trainer`` already calls ``optimizer.eval()`` before every evaluation and
``optimizer.train()`` before every training step (through Accelerate's optimizer wrapper), so
evaluation sees ``w - mu m`` and training is unchanged by it. What it does not do is leave the
model at ``w - mu m`` when training ends: the model holds ``w`` or ``w - mu m`` depending on
whether an evaluation happened to run last. This callback switches every Neumann optimizer to
eval mode at the end of ``train()``, so ``trainer.save_model()``, ``push_to_hub()`` and a later
``trainer.evaluate()`` see the evaluation weights. With ``load_best_model_at_end=True`` the model
already holds the best checkpoint's weights, which the ``Trainer`` saved right after evaluating,
that is at ``w - mu m``: they are kept as they are.

Importing this module needs ``transformers``; ``import neumann_optimizer`` does not.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..monitoring import StepLog
from . import unwrap_neumann

__all__ = ["EvaluationWeightsCallback", "NeumannLogCallback"]


def expect_run_length(state: TrainerState, opt: Any) -> None:
    """Tell the optimizer the run's length in optimizer steps (``num_train_epochs``/``max_steps``, as
    the ``Trainer`` resolved them), so that a burn-in too long for it is warned about."""
    if opt is not None and state.max_steps and state.max_steps > 0:
        opt.set_total_steps(int(state.max_steps))


class EvaluationWeightsCallback(TrainerCallback):
    """Leave the model at the evaluation weights when ``Trainer.train()`` ends (see the module doc);
    at the start, warn when the burn-in is more than a quarter of the run (``state.max_steps``)."""

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, optimizer: Any = None, **kw: Any
    ) -> None:
        expect_run_length(state, unwrap_neumann(optimizer))

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        opt = unwrap_neumann(optimizer)
        if opt is None:
            return
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            opt._adopt_evaluation_weights()  # the loaded best weights are evaluation weights already
        else:
            opt.eval()


class NeumannLogCallback(TrainerCallback):
    """Log Neumann's own quantities (``neumann_optimizer.monitoring``: phase, mu, ||w - v||,
    gradient norm, the cubic and repulsive forces and their ratio to it, skipped steps) through
    ``trainer.log`` every ``every_n_steps`` optimizer steps, so they reach ``log_history`` and
    every ``report_to`` integration (TensorBoard, W&B, ...) beside the loss.

    .. code-block:: python

        trainer = Trainer(..., optimizers=(opt, scheduler))
        trainer.add_callback(NeumannLogCallback(trainer, every_n_steps=50))

    It holds the trainer because a ``TrainerCallback`` cannot add to the logs otherwise: the
    reporting callbacks have already seen them when a later callback's ``on_log`` runs.
    """

    def __init__(self, trainer: Any, every_n_steps: int = 50) -> None:
        self.trainer = trainer
        self.every_n_steps = every_n_steps
        self._log: StepLog | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, optimizer: Any = None, **kw: Any
    ) -> None:
        self.on_train_end(args, state, control)
        opt = unwrap_neumann(optimizer)
        expect_run_length(state, opt)
        if opt is not None:
            self._log = StepLog(opt, self.every_n_steps)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        metrics = self._log.take() if self._log is not None else None
        if metrics:
            self.trainer.log(metrics)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self._log is not None:
            self._log.remove()
            self._log = None
