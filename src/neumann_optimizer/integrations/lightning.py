"""PyTorch Lightning: evaluate, test, predict and export at the evaluation weights ``w - mu m``.

.. code-block:: python

    from neumann_optimizer.integrations.lightning import EvaluationWeights

    trainer = lightning.Trainer(callbacks=[EvaluationWeights()])

A thin callback around the optimizer's own :meth:`~neumann_optimizer.Neumann.eval` and
:meth:`~neumann_optimizer.Neumann.train` (as Lightning's ``StochasticWeightAveraging`` wraps
``torch.optim.swa_utils``): every Neumann optimizer of the trainer is switched to ``w - mu m``
for validation (sanity checks included), test and predict, and back for training; when ``fit``
ends the model is left at ``w - mu m``, so what you save or export after ``trainer.fit`` is the
evaluation weights. Other optimizers are not touched. Works with automatic and manual
optimization, and with checkpoints saved in either mode: a checkpoint taken in eval mode holds
``w - mu m`` in its ``state_dict`` (for inference) and the training weights in the optimizer
state (exact mode), which ``train()`` restores on resume.

Importing this module needs ``lightning``; ``import neumann_optimizer`` does not.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ..monitoring import StepLog
from ..optimizer import Neumann
from . import unwrap_neumann

__all__ = ["EvaluationWeights", "NeumannMonitor", "neumann_optimizers"]


def neumann_optimizers(optimizers: Any) -> list[Neumann]:
    """The Neumann optimizers among ``optimizers`` (through the frameworks' wrappers)."""
    return [n for n in map(unwrap_neumann, optimizers or []) if n is not None]


def expect_run_length(trainer: pl.Trainer, opts: list[Neumann]) -> None:
    """Tell each optimizer the run's length in optimizer steps (``max_epochs``/``max_steps``, gradient
    accumulation included), so that a burn-in too long for it is warned about."""
    total = trainer.estimated_stepping_batches
    if isinstance(total, (int, float)) and 0 < total < float("inf"):
        for opt in opts:
            opt.set_total_steps(int(total))


def _batchnorm_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for m_name, m in module.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        for k, v in ((f"{m_name}.{b}", buf) for b, buf in m.named_buffers(recurse=False) if buf is not None)
    }


class EvaluationWeights(pl.Callback):
    """Switch Neumann optimizers to the evaluation weights outside training (see the module doc).

    Args:
        update_bn: recompute BatchNorm running statistics at the evaluation weights from the
            training dataloader before validation, test and predict (``torch.optim.swa_utils.
            update_bn``: one pass of ``pl_module(batch[0])`` for tuple batches), and restore the
            training-time statistics afterwards; at the end of ``fit`` the recomputed statistics
            stay with the exported weights. Skipped during the sanity check.
    """

    def __init__(self, update_bn: bool = False) -> None:
        self.update_bn = update_bn
        self._restore: list[tuple[Neumann, bool]] = []
        self._bn_saved: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ switching
    def _enter(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opts = neumann_optimizers(trainer.optimizers)
        self._restore = [(opt, opt.training) for opt in opts]
        for opt in opts:
            opt.eval()
        if opts and self.update_bn and not trainer.sanity_checking:
            self._bn_saved = _batchnorm_state(pl_module)
            if self._bn_saved:
                self._recompute_bn(trainer, pl_module)

    def _leave(self, pl_module: pl.LightningModule) -> None:
        if self._bn_saved:
            pl_module.load_state_dict(self._bn_saved, strict=False)
        self._bn_saved = None
        for opt, was_training in self._restore:
            if was_training:
                opt.train()
        self._restore = []

    def _recompute_bn(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        if loader is None:
            rank_zero_warn("EvaluationWeights(update_bn=True): no training dataloader; BatchNorm statistics kept")
            return
        torch.optim.swa_utils.update_bn(loader, pl_module, device=pl_module.device)

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a checkpoint saved in eval mode restores the optimizer in eval mode: back to w
        opts = neumann_optimizers(trainer.optimizers)
        for opt in opts:
            opt.train()
        expect_run_length(trainer, opts)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._leave(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._leave(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._leave(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opts = neumann_optimizers(trainer.optimizers)
        for opt in opts:
            opt.eval()
        if opts and self.update_bn and _batchnorm_state(pl_module):
            self._recompute_bn(trainer, pl_module)


class NeumannMonitor(pl.Callback):
    """Log Neumann's own quantities (``neumann_optimizer.monitoring``: phase, mu, ||w - v||,
    gradient norm, the cubic and repulsive forces and their ratio to it, skipped steps) to every
    logger of the trainer, every ``every_n_steps`` optimizer steps, at the trainer's global step.

    .. code-block:: python

        trainer = lightning.Trainer(callbacks=[NeumannMonitor(every_n_steps=50)])

    With several Neumann optimizers the names carry ``neumann{i}/``. Lightning's own
    ``LearningRateMonitor(log_momentum=True)`` logs the mu of the last step as well.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps
        self._logs: list[StepLog] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()
        opts = neumann_optimizers(trainer.optimizers)
        expect_run_length(trainer, opts)
        prefixes = ["neumann"] if len(opts) == 1 else [f"neumann{i}" for i in range(len(opts))]
        self._logs = [StepLog(opt, self.every_n_steps, prefix=pre) for opt, pre in zip(opts, prefixes, strict=True)]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        for log in self._logs:
            metrics = log.take()
            if metrics:
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()

    def _remove(self) -> None:
        for log in self._logs:
            log.remove()
        self._logs = []
