"""An independent float64 NumPy reference of the Neumann optimizer, written from SPEC section 3.

It shares no code with the library: each parameter group is one flat vector, the schedule is
spelled out step by step, and every formula is the SPEC's own (no lerp, no fused kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RefGroup:
    w: np.ndarray  # flat float64 vector of the group's parameters
    lr: float
    burn_in: int
    reset0: int
    growth: float
    mu_min: float
    mu_max: float
    tau: float
    alpha: float
    beta_per_n: float
    gamma: float
    wd: float
    reg_power: float = 0.0  # alpha, beta x (eta / lr)^p: 0 is the paper's constant regularizers
    m: np.ndarray = field(init=False)
    v: np.ndarray = field(init=False)
    s: int = 0
    next_reset: int = 1
    k: int = 0
    last_mu: float = 0.0

    @classmethod
    def from_hyperparameters(cls, w: np.ndarray, hp: dict) -> RefGroup:
        """A group from ``Neumann``'s keyword arguments (``momentum`` a pair; no weight decay if absent)."""
        return cls(
            w=w,
            lr=hp["lr"],
            burn_in=hp["burn_in_steps"],
            reset0=hp["reset_steps"],
            growth=hp["reset_growth"],
            mu_min=hp["momentum"][0],
            mu_max=hp["momentum"][1],
            tau=hp["momentum_ramp_steps"],
            alpha=hp["cubic_weight"],
            beta_per_n=hp["repulsive_weight"],
            gamma=hp["ema_decay"],
            wd=hp.get("weight_decay", 0.0),
        )

    def __post_init__(self) -> None:
        self.w = self.w.astype(np.float64).copy()
        self.m = np.zeros_like(self.w)
        self.v = self.w.copy()  # v = w_0, kept through burn-in
        self.k = self.reset0

    def step(self, grad: np.ndarray, lr: float | None = None, mu: float | None = None) -> None:
        """One step; ``mu`` given: a constant momentum for this step instead of the ramp."""
        eta = self.lr if lr is None else lr
        g = grad + self.wd * self.w
        self.s += 1
        if self.s <= self.burn_in:
            self.w = self.w - eta * g
            return
        t = self.s - self.burn_in
        if mu is None:
            mu = min(max(1.0 - 1.0 / (1.0 + t / self.tau), self.mu_min), self.mu_max)
        if t == self.next_reset:
            d = g
            self.m = -eta * d
            self.next_reset += self.k
            self.k = max(1, math.floor(self.growth * self.k))
        else:
            x = self.w - self.v
            r = float(np.sqrt(np.sum(x * x)))
            scale = (eta / self.lr) ** self.reg_power if self.reg_power else 1.0
            alpha, beta = scale * self.alpha, scale * self.beta_per_n * self.w.size
            if r > 0 and math.isfinite(r):
                d = g + (alpha * r**2 - beta / r**2) * x / r
            else:
                d = g
            self.m = mu * self.m - eta * d
        self.w = self.w + mu * self.m - eta * d
        self.v = self.w + self.gamma * (self.v - self.w)
        self.last_mu = mu

    def eval_weights(self) -> np.ndarray:
        return self.w - self.last_mu * self.m
