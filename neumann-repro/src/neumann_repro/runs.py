"""What finished runs say: final and best errors, means over seeds, curves (a run is the record
``train.run`` returns: its config, per-epoch history and whether it diverged)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

CHANCE_ERROR = 90.0  # a diverged run counts as chance level (10 classes) when tuning


def final(res: dict[str, Any], metric: str = "test_error") -> float:
    """The last epoch's metric; chance error for a diverged run."""
    if res["diverged"] or not res["history"]:
        return CHANCE_ERROR if metric.endswith("error") else math.inf
    value = res["history"][-1][metric]
    return value if math.isfinite(value) else CHANCE_ERROR


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation; the deviation of one value is unknown (nan), so a
    single seed never passes for a noiseless result."""
    v = list(values)
    if not v:
        return math.nan, math.nan
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else math.nan)


def by(results: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        out[tuple(r["config"].get(k) for k in keys)].append(r)
    return dict(out)


def mean_curve(results: list[dict[str, Any]], metric: str = "test_error") -> list[float]:
    """Mean over seeds of a per-epoch metric (diverged epochs count as chance)."""
    epochs = max(len(r["history"]) for r in results)
    n = max(r["config"]["epochs"] for r in results)
    curve = []
    for e in range(max(epochs, n)):
        vals = []
        for r in results:
            h = r["history"]
            vals.append(h[e][metric] if e < len(h) and math.isfinite(h[e][metric]) else CHANCE_ERROR)
        curve.append(statistics.fmean(vals))
    return curve


def epochs_to_reach(curve: list[float], target: float) -> int | None:
    for e, v in enumerate(curve, start=1):
        if v <= target:
            return e
    return None
