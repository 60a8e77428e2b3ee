"""The rule that calls a difference between two optimizers real, from their per-seed results.

**The rule** (since 2026-12-04): Welch's two-sided t-test on the two samples of per-seed values at
level ``ALPHA`` = 5%; ``p < ALPHA`` calls the difference real ("better"/"worse"), otherwise the two
"cannot be told apart". It needs at least two seeds on each side. Its false-positive rate on A/A
controls (the default against itself on disjoint seeds) is measured by the ``calibration`` study
(docs/REPRODUCTION.md, "calibration").

The reporting seeds of a result are disjoint from the seeds that tuned it wherever the data allow:
:func:`reporting` drops the tuning seeds (``seed < tune_seeds``) from a study's runs.

The rule it replaces (kept as :func:`two_se` for the calibration's comparison): a difference beyond
two standard errors, ``2 sqrt(s1^2/n1 + s2^2/n2)``. With 3 seeds a side it amounts to a t-test at
t = 2 with about 4 degrees of freedom, a nominal false-positive rate near 12%; the calibration
measured more.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

ALPHA = 0.05


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test of equal means; ``None`` with fewer than two values on
    a side. Two samples without spread: 0 where their means differ, 1 where they do not."""
    return contrast_p([a, b], [1.0, -1.0])


def contrast_p(samples: Sequence[Sequence[float]], weights: Sequence[float]) -> float | None:
    """Two-sided p-value that ``sum(w_i mean_i) = 0`` for independent samples of unequal variances
    (Welch's test generalised by the Welch-Satterthwaite degrees of freedom; with weights 1, -1 it
    is Welch's t-test). ``None`` where a sample with a weight has fewer than two values."""
    used = [(list(x), w) for x, w in zip(samples, weights, strict=True) if w != 0]
    if any(len(x) < 2 for x, _ in used):
        return None
    est = sum(w * statistics.fmean(x) for x, w in used)
    parts = [w * w * statistics.variance(x) / len(x) for x, w in used]
    var = sum(parts)
    if var == 0:
        return 0.0 if est != 0 else 1.0
    df = var**2 / sum(v * v / (len(x) - 1) for v, (x, _) in zip(parts, used, strict=True))
    return _student_two_sided(abs(est) / math.sqrt(var), df)


def _student_two_sided(t: float, df: float) -> float:
    """P(|T| >= t) for Student's t with ``df`` degrees of freedom (scipy's distribution)."""
    from scipy.stats import t as student

    return float(2 * student.sf(t, df))


def two_se(a: Sequence[float], b: Sequence[float]) -> bool:
    """The old rule: do the means differ by more than two standard errors of their difference?"""
    if len(a) < 2 or len(b) < 2:
        return False
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return abs(statistics.fmean(a) - statistics.fmean(b)) > 2 * se


def compare(ours: Sequence[float], theirs: Sequence[float], lower_is_better: bool = True) -> tuple[str, float | None]:
    """``("better" | "worse" | "cannot tell", p)``: ours against theirs by the rule."""
    p = welch_p(ours, theirs)
    if p is None or p >= ALPHA:
        return "cannot tell", p
    ours_lower = statistics.fmean(ours) < statistics.fmean(theirs)
    return ("better" if ours_lower == lower_is_better else "worse"), p


WORDS = {"better": "better", "worse": "worse", "cannot tell": "cannot be told apart"}


def judge(ours: Sequence[float], theirs: Sequence[float], lower_is_better: bool = True) -> str:
    """The verdict in words, with its p-value: "better (Welch p = 0.003, 3 vs 3 seeds)",
    "cannot be told apart (Welch p = 0.41, 2 vs 2 seeds)"."""
    word, p = compare(ours, theirs, lower_is_better)
    return f"{WORDS[word]} ({said_p(p, f'{len(ours)} vs {len(theirs)} seeds')})"


def said_p(p: float | None, seeds: str) -> str:
    """How a verdict cites its test: "Welch p = 0.03, 3 vs 3 seeds"."""
    if p is None:
        return f"no test: {seeds}; a verdict needs at least 2 reporting seeds a side"
    return f"Welch p = {p:.2g}, {seeds}"


def reporting(runs: Sequence[dict[str, Any]], tune_seeds: int) -> list[dict[str, Any]]:
    """The runs whose seeds did not tune the result (``seed >= tune_seeds``)."""
    return [r for r in runs if r["config"]["seed"] >= tune_seeds]
