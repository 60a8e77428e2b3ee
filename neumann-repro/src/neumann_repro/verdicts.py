"""The rule that calls a difference between two optimizers real, from their per-seed results.

**The rule** (since 2026-12-07): an error difference by Welch's two-sided t-test
(:func:`error_contrast`), steps to a target by an exact rank test with misses tied last
(:func:`steps_contrast`); each with its 95% interval, its p Holm-adjusted over the study's family
(:func:`settle`), and a decision (:func:`decide`): "differs" (Holm p < ``ALPHA`` = 5%),
"equivalent" (the 90% interval inside the margin: two one-sided tests), "inconclusive". It needs
at least two seeds on each side. Its false-positive rate on A/A controls (the default against
itself on disjoint seeds) is measured by the ``calibration`` study (docs/REPRODUCTION.md,
"calibration").

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
    a side. Two samples without spread (the t statistic undefined): the exact rank test's p."""
    return contrast_p([a, b], [1.0, -1.0])


def _contrast(
    samples: Sequence[Sequence[float]], weights: Sequence[float]
) -> tuple[float, float, float, list[list[float]]] | None:
    """``sum(w_i mean_i)``, its variance, Welch-Satterthwaite degrees of freedom (``nan`` without spread) and the
    weighted samples; ``None`` where a sample with a weight has fewer than two values."""
    used = [(list(x), w) for x, w in zip(samples, weights, strict=True) if w != 0]
    if any(len(x) < 2 for x, _ in used):
        return None
    est = sum(w * statistics.fmean(x) for x, w in used)
    parts = [w * w * statistics.variance(x) / len(x) for x, w in used]
    var = sum(parts)
    df = var**2 / sum(v * v / (len(x) - 1) for v, (x, _) in zip(parts, used, strict=True)) if var > 0 else math.nan
    return est, var, df, [x for x, _ in used]


def contrast_p(samples: Sequence[Sequence[float]], weights: Sequence[float]) -> float | None:
    """Two-sided p-value that ``sum(w_i mean_i) = 0`` for independent samples of unequal variances
    (Welch's test generalised by the Welch-Satterthwaite degrees of freedom; with weights 1, -1 it
    is Welch's t-test). ``None`` where a sample with a weight has fewer than two values. Samples
    without spread leave the statistic undefined: equal estimates give 1, two samples the exact rank
    test's p (:func:`rank_p`: 2/70 for 4 distinct constants a side, never 0), more give ``None``."""
    c = _contrast(samples, weights)
    if c is None:
        return None
    est, var, df, used = c
    if var == 0:
        if est == 0:
            return 1.0
        return rank_p(used[0], used[1]) if len(used) == 2 else None
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


def said_p(p: float | None, seeds: str) -> str:
    """How a verdict cites its test: "Welch p = 0.03, 3 vs 3 seeds"."""
    if p is None:
        return f"no test: {seeds}; a verdict needs at least 2 reporting seeds a side"
    return f"Welch p = {p:.2g}, {seeds}"


def reporting(runs: Sequence[dict[str, Any]], tune_seeds: int) -> list[dict[str, Any]]:
    """The runs whose seeds did not tune the result (``seed >= tune_seeds``)."""
    return [r for r in runs if r["config"]["seed"] >= tune_seeds]


# ---------------------------------------------------------------- intervals, Holm, equivalence
# Steps to a target, with misses censored: an exact rank test and a Hodges-Lehmann interval; every
# family of comparisons Holm-adjusted; "cannot tell" split into "equivalent within the margin" (two
# one-sided tests at 5%, i.e. the 90% interval inside the margin) and "inconclusive".
STEPS_MARGIN = math.log2(1.1)  # equivalence margin for steps: 10% either way (on log2 steps)
ERROR_MARGIN = 0.3  # equivalence margin for an error: 0.3 percentage points either way


def _midranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def rank_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of the exact permutation test on rank sums (Wilcoxon-Mann-Whitney with
    midranks for ties; ``inf`` values, misses, tie last). ``None`` with fewer than two values a side.
    Exact: every split of the pooled ranks is enumerated (12,870 for 8 a side)."""
    import itertools

    if len(a) < 2 or len(b) < 2:
        return None
    ranks = _midranks([*a, *b])
    n, total = len(a), sum(ranks)
    expect = n * total / len(ranks)
    seen = abs(sum(ranks[:n]) - expect)
    count = hits = 0
    for combo in itertools.combinations(ranks, n):
        count += 1
        hits += abs(sum(combo) - expect) >= seen - 1e-9
    return hits / count


def _u_quantile(n: int, m: int, alpha: float) -> int:
    """The largest k with P(U < k) <= alpha / 2 under the null (no ties): the Hodges-Lehmann
    interval's order statistic."""
    import itertools

    counts: dict[int, int] = {}
    for combo in itertools.combinations(range(n + m), n):
        u = sum(combo) - n * (n - 1) // 2
        counts[u] = counts.get(u, 0) + 1
    total, k, below = sum(counts.values()), 0, 0
    while below + counts.get(k, 0) <= alpha / 2 * total:
        below += counts.get(k, 0)
        k += 1
    return k


def shift_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """The Hodges-Lehmann shift of ``a`` over ``b`` (the median of the pairwise differences) and its
    distribution-free interval (Moses), from the exact null distribution of U. ``inf`` (misses) make
    the differences they enter ``+-inf``, and two misses differ by 0: an open side of the interval
    says the data cannot bound it. ``None`` with fewer than two values a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    diffs = sorted(0.0 if x == y else x - y for x in a for y in b)
    k = _u_quantile(len(a), len(b), 1 - level)
    lo, hi = (diffs[k - 1], diffs[-k]) if k >= 1 else (-math.inf, math.inf)
    return statistics.median(diffs), lo, hi


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """mean(a) - mean(b) and its Welch interval; ``None`` with fewer than two values a side. Two
    samples without spread have a zero-width interval at their difference."""
    return contrast_interval([a, b], [1.0, -1.0], level)


def contrast_interval(
    samples: Sequence[Sequence[float]], weights: Sequence[float], level: float = 0.95
) -> tuple[float, float, float] | None:
    """``sum(w_i mean_i)`` of independent samples and its interval, Welch-Satterthwaite degrees of freedom (the
    interval :func:`contrast_p` tests); ``None`` where a sample with a weight has fewer than two values. Samples
    without spread give a zero-width interval at the estimate."""
    from scipy.stats import t as student

    c = _contrast(samples, weights)
    if c is None:
        return None
    est, var, df, _ = c
    if var == 0:
        return est, est, est
    h = float(student.ppf(0.5 + level / 2, df)) * math.sqrt(var)
    return est, est - h, est + h


def holm(ps: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (``None``: no test, not counted)."""
    idx = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])  # type: ignore[arg-type,return-value]
    out: list[float | None] = [None] * len(ps)
    run, m = 0.0, len(idx)
    for rank, i in enumerate(idx):
        run = max(run, min(1.0, (m - rank) * ps[i]))  # type: ignore[operator]
        out[i] = run
    return out


def decide(p_adj: float | None, ci90: tuple[float, float] | None, margin: float) -> str:
    """ "differs" (Holm-adjusted p < ALPHA), "equivalent" (the 90% interval inside +-margin: two
    one-sided tests at 5%), "inconclusive", or "no test"."""
    if p_adj is None or ci90 is None:
        return "no test"
    if p_adj < ALPHA:
        return "differs"
    return "equivalent" if -margin < ci90[0] and ci90[1] < margin else "inconclusive"


def steps_contrast(a: Sequence[float], b: Sequence[float]) -> dict[str, Any] | None:
    """Steps to a target of ``a`` against ``b`` (misses ``inf``): the ratio (2 to the Hodges-Lehmann
    shift of log2 steps) with its 95% interval, the rank test's p, and the 90% interval of the log2
    shift for the equivalence test. ``None`` with fewer than two reporting seeds a side."""
    la, lb = [math.log2(x) for x in a], [math.log2(x) for x in b]
    s95, s90, p = shift_interval(la, lb, 0.95), shift_interval(la, lb, 0.90), rank_p(a, b)
    if s95 is None or s90 is None:
        return None
    return dict(ratio=2 ** s95[0], lo=2 ** s95[1], hi=2 ** s95[2], p=p, ci90=(s90[1], s90[2]))


def settle(family: Sequence[dict[str, Any] | None], margin: float) -> None:
    """Holm-adjust a family of contrasts in place (``p_holm``) and decide each (``decision``)."""
    adjusted = holm([c["p"] if c else None for c in family])
    for c, q in zip(family, adjusted, strict=True):
        if c is not None:
            c["p_holm"], c["decision"] = q, decide(q, c["ci90"], margin)


def steps_number(x: float) -> str:
    """A ratio of steps or an end of its interval: 0 or infinite where misses, tied last, decide the shift."""
    return "0" if x == 0 else "∞" if math.isinf(x) else f"{x:.2f}"


def said_steps(c: dict[str, Any] | None, reached: str, family: int) -> str:
    """A steps verdict in words: "x0.82 (95%: 0.71-0.95), fewer steps (Holm p = 0.01 of 5 tests; 8 of
    8 vs 8 of 8 seeds reached)"."""
    if c is None:
        return "no test (fewer than 2 reporting seeds a side)"
    word = {
        "differs": "fewer steps" if c["ratio"] < 1 else "more steps",
        "equivalent": f"equivalent within ±{100 * (2**STEPS_MARGIN - 1):.0f}%",
        "inconclusive": "inconclusive",
        "no test": "no test",
    }[c["decision"]]

    ratio, lo, hi = steps_number(c["ratio"]), steps_number(c["lo"]), steps_number(c["hi"])
    why = ", the misses decide it" if ratio in ("0", "∞") else ""
    return f"x{ratio} (95%: {lo}-{hi}{why}), {word} (Holm p = {c['p_holm']:.2g} in {family} tests; {reached})"


ERROR_RULE = (
    "Each verdict: the difference in mean test error (first minus second, in points: positive means the first is "
    "worse) with its 95% Welch interval, Welch's p Holm-adjusted over its family; 'equivalent within "
    "±0.3' where the 90% interval lies inside ±0.3 points (two one-sided tests at 5%), 'inconclusive' otherwise."
)


def error_contrast(a: Sequence[float], b: Sequence[float]) -> dict[str, Any] | None:
    """mean(a) - mean(b) of an error with its 95% Welch interval, Welch's p and the 90% interval."""
    w95, w90 = welch_interval(a, b, 0.95), welch_interval(a, b, 0.90)
    if w95 is None or w90 is None:
        return None
    return dict(diff=w95[0], lo=w95[1], hi=w95[2], p=welch_p(a, b), ci90=(w90[1], w90[2]))


def said_error(c: dict[str, Any] | None, first: str) -> str:
    """An error verdict in words: "+0.42 (95%: 0.10 to 0.74), the default worse (Holm p = 0.02)"."""
    if c is None:
        return "no test (fewer than 2 reporting seeds a side)"
    word = {
        "differs": f"{first} {'worse' if c['diff'] > 0 else 'better'}",
        "equivalent": f"equivalent within ±{ERROR_MARGIN:g}",
        "inconclusive": "inconclusive",
        "no test": "no test",
    }[c["decision"]]
    return f"{c['diff']:+.2f} (95%: {c['lo']:+.2f} to {c['hi']:+.2f}), {word} (Holm p = {c['p_holm']:.2g})"
