"""Checks a state dict before a Neumann optimizer loads it."""

from __future__ import annotations

from typing import Any


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
