"""Checks a state dict before a Neumann optimizer loads it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .functional import LOW_PRECISION


def v_dtype(p: Tensor) -> torch.dtype:
    """The moving average ``v`` of a bfloat16/float16 parameter is kept in float32: its increments,
    1% of ``w - v`` per step, fall below half an ulp of a low-precision ``v`` once ``|w - v|`` is
    under about 0.2 ``|v|``, and it would stop moving. Other parameters keep their own dtype."""
    return torch.float32 if p.dtype in LOW_PRECISION else p.dtype


def saved_averages(opt: Any, state_dict: dict[str, Any]) -> list[tuple[Tensor, Tensor]]:
    """(parameter, saved ``v``) for the low-precision parameters of a state dict about to be loaded."""
    out = []
    for saved, group in zip(state_dict["param_groups"], opt.param_groups, strict=True):
        for key, p in zip(saved["params"], group["params"], strict=True):
            v = state_dict["state"].get(key, {}).get("v")
            if v is not None and p.dtype in LOW_PRECISION:
                out.append((p, v))
    return out


def check_state_dict(opt: Any, state_dict: dict[str, Any]) -> None:
    """Refuse (``ValueError``, naming the mismatch) a state dict that is not a Neumann state of
    the same parameters: wrong group count, parameter count or shapes, missing counters or buffers."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("Neumann.load_state_dict: expected a dict with 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            f"Neumann.load_state_dict: the state dict has {len(saved_groups)} parameter groups, "
            f"this optimizer has {len(opt.param_groups)}"
        )
    for gi, (saved, group) in enumerate(zip(saved_groups, opt.param_groups, strict=True)):
        missing = [k for k in ("burn_in_steps", "reset_steps", "ema_decay", "step", "next_reset") if k not in saved]
        if missing:
            raise ValueError(
                f"Neumann.load_state_dict: param group {gi} lacks {missing}: not a state dict of a Neumann optimizer"
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
                        f"Neumann.load_state_dict: state '{name}' of {opt._param_name(gi, pi)} "
                        f"has shape {tuple(t.shape)}: a state dict of another model?"
                    )
            if "m" not in pstate:  # ("v" is absent where both regularizers were 0: the lean step)
                raise ValueError(
                    f"Neumann.load_state_dict: state of {opt._param_name(gi, pi)} lacks 'm': "
                    "not a state dict of a Neumann optimizer"
                )
