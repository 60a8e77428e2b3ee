"""The rule that calls a difference between two means real: beyond two standard errors of the
difference over seeds, ``2 sqrt(s1^2/n1 + s2^2/n2)``; within that a tie."""

from __future__ import annotations

import math
from typing import Any


def noise(a: dict[str, Any], b: dict[str, Any], mean: str, std: str, n: str) -> float:
    """Two standard errors of the difference between the means ``a[mean]`` and ``b[mean]``."""
    del mean  # (named for the caller's readability: which mean the noise is of)
    return 2 * math.sqrt(a[std] ** 2 / max(a[n], 1) + b[std] ** 2 / max(b[n], 1))


def judge(diff: float, noise: float) -> str:
    """``diff`` = Neumann's advantage (positive: Neumann lower error)."""
    if diff > noise:
        return "better beyond seed noise"
    if diff < -noise:
        return "worse beyond seed noise"
    return "a tie within seed noise"
