from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# the device the step tests put their tensors on: NEUMANN_TEST_DEVICE=cuda python -m pytest
# tests/test_reference.py tests/test_fused.py tests/test_capturable.py runs the float64 reference, the
# path matrix and the skip tests there (ElementwiseProblem's parameters, and with them every state
# tensor and gradient); on CPU nothing changes
DEVICE = torch.device(os.environ.get("NEUMANN_TEST_DEVICE", "cpu"))


class ElementwiseProblem:
    """A deterministic non-quadratic objective with an elementwise gradient.

    ``grad(w) = a * (w - c) + 0.3 * sin(3 w)``, written once for torch tensors (fed to the
    optimizer as ``.grad``) and once for NumPy (fed to the reference), for groups of parameters
    of given shapes.
    """

    def __init__(self, group_shapes: list[list[tuple[int, ...]]], seed: int, dtype=torch.float64):
        rng = np.random.default_rng(seed)
        self.group_shapes = group_shapes
        self.a = [[rng.uniform(0.2, 2.0, size=s) for s in shapes] for shapes in group_shapes]
        self.c = [[rng.normal(size=s) for s in shapes] for shapes in group_shapes]
        self.w0 = [[rng.normal(size=s) for s in shapes] for shapes in group_shapes]
        self.params = [[torch.tensor(w, dtype=dtype, device=DEVICE, requires_grad=True) for w in ws] for ws in self.w0]

    def set_grads(self) -> None:
        with torch.no_grad():
            for ps, as_, cs in zip(self.params, self.a, self.c, strict=True):
                for p, a, c in zip(ps, as_, cs, strict=True):
                    a_t = torch.as_tensor(a, dtype=p.dtype, device=p.device)
                    c_t = torch.as_tensor(c, dtype=p.dtype, device=p.device)
                    p.grad = a_t * (p - c_t) + 0.3 * torch.sin(3 * p)

    def np_grad(self, gi: int, w_flat: np.ndarray) -> np.ndarray:
        a = np.concatenate([x.ravel() for x in self.a[gi]])
        c = np.concatenate([x.ravel() for x in self.c[gi]])
        return a * (w_flat - c) + 0.3 * np.sin(3 * w_flat)

    def flat_w0(self, gi: int) -> np.ndarray:
        return np.concatenate([x.ravel() for x in self.w0[gi]])


def flat(ts) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1).double() for t in ts]).cpu().numpy()


@pytest.fixture
def problem_factory():
    return ElementwiseProblem
