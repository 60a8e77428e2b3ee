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


# each saved param group carries its parameters' shapes, so a state dict taken before any step (no
# per-parameter state yet) is still checked against the model it is loaded into
SHAPES_KEY = "param_shapes"


def with_shapes(state_dict: dict[str, Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """``state_dict`` with each group's parameter shapes under ``SHAPES_KEY``."""
    for saved, group in zip(state_dict["param_groups"], groups, strict=True):
        saved[SHAPES_KEY] = [list(p.shape) for p in group["params"]]
    return state_dict


def without_shapes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``state_dict`` whose groups lack ``SHAPES_KEY`` (so it does not land in
    ``param_groups``); the caller's dict is left as it is."""
    groups = [{k: v for k, v in g.items() if k != SHAPES_KEY} for g in state_dict["param_groups"]]
    return {**state_dict, "param_groups": groups}


def _check_shapes(opt: Any, gi: int, saved: Any, params: list[Tensor]) -> None:
    if saved is None:  # (state dicts of older versions)
        return
    here = [list(p.shape) for p in params]
    if [list(s) for s in saved] == here:
        return
    if sorted(map(list, saved)) == sorted(here):  # (a checkpointer that reordered the group's parameters)
        return
    for pi, (a, b) in enumerate(zip(saved, here, strict=True)):
        if list(a) != b:
            raise ValueError(
                f"Neumann.load_state_dict: {opt._param_name(gi, pi)} had shape {tuple(a)} when the state "
                "dict was saved: a state dict of another model?"
            )


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
        _check_shapes(opt, gi, saved.get(SHAPES_KEY), group["params"])
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


def buffers(state: Any, params: list[Tensor], lean: bool) -> tuple[list[Tensor], list[Tensor]]:
    """Each parameter's ``m`` and ``v`` (created at its first step; a lean group keeps no ``v``)."""
    ms, vs = [], []
    for p in params:
        st = state[p]
        if "m" not in st:
            st["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if lean:
            st.pop("v", None)  # no regularizer: the step needs no v (memory as SGD's)
        elif "v" not in st:  # w_0 at the first step; the current weights once a regularizer is on
            st["v"] = p.detach().to(dtype=v_dtype(p), memory_format=torch.preserve_format, copy=True)
        ms.append(st["m"])
        vs.append(st.get("v"))
    return ms, vs
