"""Table formatting shared by the studies' renderers."""

from __future__ import annotations

import math


def fmt(mean: float, std: float) -> str:
    """``mean ± std``, or the mean alone where there is no spread to show (one seed)."""
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def spread(n_seeds: int) -> str:
    """How a table's errors are summarised: a mean and standard deviation needs two seeds."""
    return "mean ± std" if n_seeds > 1 else "one seed, so no spread"


def lr_range(tried: list[float]) -> str:
    """How many learning rates a cell tried, and their range."""
    return f"{len(tried)}: {min(tried):g}-{max(tried):g}"
