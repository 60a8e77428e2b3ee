"""Evaluation weights ``w - mu m`` (SPEC section 3.3): switching a Neumann optimizer's parameters to
them and back, and reading them without touching the model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor


class EvaluationWeights:
    """Mixin for :class:`~neumann_optimizer.Neumann`: ``eval()``, ``train()``, ``evaluation()``
    and ``evaluation_weights()``. Uses the optimizer's ``param_groups`` (``last_momentum``,
    ``train_mode``, ``eval_shift``, ``evaluation``) and per-parameter ``state`` (``m``, and
    ``train_param`` while in eval mode with ``evaluation="exact"``)."""

    param_groups: list[dict[str, Any]]
    state: Any

    def _sync_counters(self) -> None:
        """Bring counters kept on the device (compiled steps) to the host; the optimizer's own."""

    @property
    def training(self) -> bool:
        """False between :meth:`eval` and :meth:`train`."""
        return all(g["train_mode"] for g in self.param_groups)

    # ------------------------------------------------------------------ evaluation weights
    @torch.no_grad()
    def eval(self) -> None:
        """Switch the parameters to the evaluation weights ``w - mu m`` (idempotent).

        With ``evaluation="exact"`` (default) the training weights are kept aside and
        :meth:`train` restores them bit for bit; with ``evaluation="in_place"`` nothing is copied
        and :meth:`train` adds ``mu m`` back (within float rounding). With BatchNorm, recompute
        the running statistics afterwards (``torch.optim.swa_utils.update_bn``).
        """
        self._sync_counters()
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
        self._sync_counters()
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
        self._sync_counters()
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
        self._sync_counters()
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
