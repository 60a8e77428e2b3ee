"""The adaptive momentum (our extension, kept with the reproduction)."""

from __future__ import annotations

import pytest
import torch
from neumann_repro.adaptive import AdaptiveMomentum, momentum_from_curvature
from torch import nn

from neumann_optimizer import Neumann


def test_momentum_from_curvature():
    assert momentum_from_curvature(-1.0, 9.0) == pytest.approx(0.9)
    assert momentum_from_curvature(-1.0, 3.0) == pytest.approx(0.75)
    assert momentum_from_curvature(-5.0, 1.0) == 0.5  # clipped
    assert momentum_from_curvature(-1.0, -0.5) == 0.5


def test_adaptive_momentum_sets_group_momentum_every_n_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = Neumann(model.parameters(), lr=0.05, burn_in_steps=0, reset_steps=100, momentum_ramp_steps=1)
    ada = AdaptiveMomentum(opt, every=3, iterations=5)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    for _ in range(7):
        ada.update(lambda: nn.functional.cross_entropy(model(x), y))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert [h[0] for h in ada.history] == [1, 4, 7]
    mu = ada.history[-1][3]
    assert 0.5 <= mu <= 0.9 and opt.param_groups[0]["momentum_bounds"] == (mu, mu)
    assert opt.param_groups[0]["last_momentum"] == pytest.approx(ada.history[-1][3])
