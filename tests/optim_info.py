"""``Neumann`` described by PyTorch's own ``OptimizerInfo`` (``torch.testing._internal.common_optimizers``),
the table PyTorch's generic optimizer tests (``test/test_optim.py``) are driven by. Our tests in
``test_optim_info.py`` use it; PyTorch's suite can be pointed at it from outside.

Truthful to the code: ``foreach`` and ``fused`` are supported (fused on CPU through our C kernel or
the compiled graph, on CUDA through the compiled graph), complex parameters and ``capturable`` are,
sparse gradients and ``differentiable``/``maximize`` are not.
"""

from __future__ import annotations

import inspect

import torch
from torch.optim.lr_scheduler import ExponentialLR, ReduceLROnPlateau, StepLR
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
)

from neumann_optimizer import Neumann

# importing torch's internal test utilities freezes torch.backends' global flags (its own suite sets
# them through context managers); the rest of our suite (Lightning, say) sets them directly
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True

# short schedules, so a few steps cover burn-in, resets and regularized steps
SHORT = dict(burn_in_steps=2, reset_steps=3, momentum_ramp_steps=2)


def neumann_inputs(device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> list[OptimizerInput]:
    strong = dict(cubic_weight=1e-2, repulsive_weight=1e-3)  # regularizers large enough to matter
    return [
        OptimizerInput(params=None, kwargs=dict(lr=0.1, **SHORT), desc="defaults, short burn-in and resets"),
        OptimizerInput(params=None, kwargs=dict(lr=torch.tensor(0.05), **SHORT), desc="tensor lr"),
        OptimizerInput(params=None, kwargs=dict(lr=0.1, weight_decay=0.1, **SHORT), desc="weight decay"),
        OptimizerInput(params=None, kwargs=dict(lr=0.1, momentum=0.8, **SHORT), desc="constant momentum"),
        OptimizerInput(params=None, kwargs=dict(lr=0.1, momentum=(0.3, 0.95), **SHORT, **strong), desc="pair"),
        OptimizerInput(
            params=None, kwargs=dict(lr=0.1, regularizer_schedule="lr", **SHORT, **strong), desc="lr-scaled reg."
        ),
        OptimizerInput(params=None, kwargs=dict(lr=0.1, regularizer_schedule=2.0, **SHORT, **strong), desc="lr^2"),
        OptimizerInput(params=None, kwargs=dict(lr=0.1, nonfinite="raise", **SHORT), desc="nonfinite raise"),
        OptimizerInput(params=None, kwargs=dict(lr=0.1, nonfinite="ignore", **SHORT), desc="nonfinite ignore"),
        OptimizerInput(params=None, kwargs=dict(lr=0.1, evaluation="in_place", **SHORT), desc="in-place eval"),
        OptimizerInput(params=None, kwargs=dict(lr=0.1, reset_growth=1.5, ema_decay=0.9, **SHORT), desc="growth"),
    ]


def neumann_error_inputs(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> list:
    p = [torch.zeros(3, device=device, dtype=dtype, requires_grad=True)]
    sparse = torch.zeros(3, device=device, dtype=dtype, requires_grad=True)
    sparse.grad = torch.zeros(3, device=device, dtype=dtype).to_sparse()
    meta = torch.zeros(3, device="meta", dtype=dtype, requires_grad=True)
    meta.grad = torch.zeros(3, device="meta", dtype=dtype)
    build = OptimizerErrorEnum.CONSTRUCTION_ERROR
    step = OptimizerErrorEnum.STEP_ERROR
    return [
        ErrorOptimizerInput(
            OptimizerInput(params=p, kwargs=dict(lr=-0.1, **SHORT), desc="negative lr"),
            error_on=build,
            error_type=ValueError,
            error_regex="lr must be",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=p, kwargs=dict(lr=0.1, ema_decay=1.5, **SHORT), desc="ema_decay > 1"),
            error_on=build,
            error_type=ValueError,
            error_regex="ema_decay",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=p, kwargs=dict(lr=0.1), desc="no step counts"),
            error_on=build,
            error_type=ValueError,
            error_regex="steps_per_epoch",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=[{"params": p}], kwargs=dict(**SHORT), desc="no lr anywhere"),
            error_on=build,
            error_type=ValueError,
            error_regex="param group 0 has no lr",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=p, kwargs=dict(lr=0.1, momentum=(0.9, 0.5), **SHORT), desc="mu_min > mu_max"),
            error_on=build,
            error_type=ValueError,
            error_regex="mu_min <= mu_max",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=p, kwargs=dict(lr=0.1, fused=True, foreach=True, **SHORT), desc="fused+foreach"),
            error_on=build,
            error_type=ValueError,
            error_regex="choose one of fused=True and foreach=True",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=[sparse], kwargs=dict(lr=0.1, **SHORT), desc="sparse gradient"),
            error_on=step,
            error_type=RuntimeError,
            error_regex="sparse gradients",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=[meta], kwargs=dict(lr=0.1, **SHORT), desc="meta parameter"),
            error_on=step,
            error_type=RuntimeError,
            error_regex="meta device",
        ),
    ]


def _known(kwargs: dict) -> dict:
    """The keyword arguments this torch's ``OptimizerInfo`` knows (older releases lack some, e.g.
    ``has_capturable_arg`` before 2.5; their defaults there describe us the same way)."""
    params = inspect.signature(OptimizerInfo.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in params}


neumann_optim_info = OptimizerInfo(
    Neumann,
    optim_inputs_func=neumann_inputs,
    optim_error_inputs_func=neumann_error_inputs,
    scheduler_inputs=(
        [lambda opt: StepLR(opt, gamma=0.9, step_size=2)],
        [lambda opt: ExponentialLR(opt, gamma=0.8)],
        [lambda opt: ReduceLROnPlateau(opt, patience=0)],
        [lambda opt: StepLR(opt, gamma=0.9, step_size=2), lambda opt: ExponentialLR(opt, gamma=0.95)],
    ),
    supported_impls=("foreach", "fused"),
    **_known(
        dict(
            supports_fused_on=("cpu", "cuda"),
            supports_complex=True,
            supports_sparse=False,
            has_capturable_arg=True,
            step_requires_closure=False,
            supports_param_groups=True,
            supports_multiple_devices=True,
        )
    ),
)
