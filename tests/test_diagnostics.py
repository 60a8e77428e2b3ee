"""Lanczos Hessian eigenvalues against dense references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from neumann_optimizer.diagnostics import hessian_eigenvalues


def _indefinite_quadratic(n, seed, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    lams = np.concatenate([[-3.0, -0.7], rng.uniform(0.1, 4.0, size=n - 3), [9.0]])
    a = q @ np.diag(lams) @ q.T
    return torch.tensor(a, dtype=dtype), lams


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_quadratic_with_known_indefinite_spectrum(dtype):
    n = 12
    a, lams = _indefinite_quadratic(n, 0, dtype)
    w = torch.randn(n, dtype=dtype, requires_grad=True)
    spec = hessian_eigenvalues(lambda: 0.5 * w @ a @ w, [w], iterations=n)
    tol = 1e-8 if dtype == torch.float64 else 1e-3
    np.testing.assert_allclose(spec.ritz_values.numpy(), np.sort(lams), atol=tol * 10, rtol=tol)
    assert spec.lambda_min == pytest.approx(-3.0, abs=tol) and spec.lambda_max == pytest.approx(9.0, abs=tol)


def test_few_iterations_bracket_the_spectrum_and_shift_never_hurts():
    n = 60
    a, lams = _indefinite_quadratic(n, 1)
    w = torch.randn(n, dtype=torch.float64, requires_grad=True)
    plain = hessian_eigenvalues(lambda: 0.5 * w @ a @ w, [w], iterations=10)
    shifted = hessian_eigenvalues(lambda: 0.5 * w @ a @ w, [w], iterations=10, min_via_shift=True)
    # Ritz values lie inside [lambda_min, lambda_max]; the extreme ones converge first
    assert lams.min() - 1e-9 <= plain.lambda_min and plain.lambda_max <= lams.max() + 1e-9
    assert plain.lambda_max == pytest.approx(9.0, rel=0.02)
    assert shifted.lambda_min <= plain.lambda_min + 1e-12
    assert shifted.lambda_min == pytest.approx(-3.0, rel=0.05)


def test_tiny_network_matches_dense_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (16,))
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of_flat(flat):
        out, i = x, 0
        ws = []
        for s in shapes:
            k = int(np.prod(s))
            ws.append(flat[i : i + k].reshape(s))
            i += k
        out = torch.tanh(out @ ws[0].T + ws[1]) @ ws[2].T + ws[3]
        return nn.functional.cross_entropy(out, y)

    dense = torch.autograd.functional.hessian(loss_of_flat, flat0)
    eig = torch.linalg.eigvalsh(dense)
    assert eig[0] < 0 < eig[-1]  # an indefinite Hessian: the test sees both ends
    spec = hessian_eigenvalues(lambda: nn.functional.cross_entropy(model(x), y), params, iterations=flat0.numel())
    assert spec.lambda_max == pytest.approx(float(eig[-1]), rel=1e-8, abs=1e-10)
    assert spec.lambda_min == pytest.approx(float(eig[0]), rel=1e-6, abs=1e-9)
