"""The verdict rule: Welch's t-test against scipy's own, its calibration on A/A draws, and the
words a verdict says."""

from __future__ import annotations

import math
import random

import pytest
from neumann_repro.studies.calibration import false_positive_rates, render_calibration
from neumann_repro.studies.calibration import verdict as calibration_verdict
from neumann_repro.verdicts import (
    ERROR_MARGIN,
    STEPS_MARGIN,
    contrast_interval,
    contrast_p,
    decide,
    error_contrast,
    holm,
    rank_p,
    reporting,
    said_steps,
    settle,
    shift_interval,
    steps_contrast,
    welch_interval,
    welch_p,
)

stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("n1,n2", [(2, 2), (3, 3), (2, 5), (5, 4), (10, 3)])
def test_welch_p_is_scipys_welch_test(n1, n2):
    rng = random.Random(n1 * 10 + n2)
    for _ in range(20):
        a = [rng.gauss(0, 1) for _ in range(n1)]
        b = [rng.gauss(rng.uniform(-2, 2), rng.uniform(0.1, 3)) for _ in range(n2)]
        ref = stats.ttest_ind(a, b, equal_var=False).pvalue
        assert welch_p(a, b) == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_contrast_p_generalises_welch():
    rng = random.Random(1)
    a, b = [rng.gauss(0, 1) for _ in range(4)], [rng.gauss(1, 2) for _ in range(3)]
    assert contrast_p([a, b], [1.0, -1.0]) == pytest.approx(welch_p(a, b), rel=1e-12)
    # two groups without spread and with equal means add nothing to the estimate or its variance
    c = [3.0, 3.0, 3.0]
    assert contrast_p([a, c, b, c], [1.0, -1.0, -1.0, 1.0]) == pytest.approx(welch_p(a, b), rel=1e-12)
    # a weight of 0 drops a sample, even one too small to test
    assert contrast_p([a, [1.0], b], [1.0, 0.0, -1.0]) == pytest.approx(welch_p(a, b), rel=1e-12)
    assert contrast_p([a, [1.0], b], [1.0, 1.0, -1.0]) is None


def test_degenerate_samples():
    assert welch_p([1.0], [2.0, 3.0]) is None
    assert welch_p([1.0, 1.0], [1.0, 1.0]) == 1.0
    # no spread on either side: the t statistic is undefined, and the exact rank test answers, never 0
    assert welch_p([1.0, 1.0], [2.0, 2.0]) == pytest.approx(2 / 6)
    assert welch_p([1.0] * 4, [2.0] * 4) == pytest.approx(2 / 70)
    assert contrast_p([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], [1.0, -2.0, 1.0]) == 1.0
    assert contrast_p([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]], [1.0, -2.0, 1.0]) is None


def test_welch_is_calibrated_and_the_old_rule_is_not_on_normal_a_a_draws():
    """Split many draws of one normal distribution into disjoint groups: Welch's test at 5% calls
    about 5% of the pairs different (a little fewer: it is conservative at small samples), the
    two-standard-error rule about twice as many at 3 seeds a side."""
    rng = random.Random(0)
    values = [rng.gauss(28.5, 1.6) for _ in range(600)]
    for n in (2, 3, 5):
        rates = false_positive_rates(values, n, splits=2000, seed=n)
        assert 0.02 <= rates["welch"] <= 0.06, (n, rates)
        # the exact rank test never passes its level (at 2 a side its smallest p is 1/3: it never rejects)
        assert rates["rank"] <= 0.06 and (n > 2 or rates["rank"] == 0), (n, rates)
    assert false_positive_rates(values, 3, splits=2000)["two_se"] > 0.09


def test_reporting_seeds_leave_the_tuning_seeds_out():
    runs = [{"config": {"seed": s}} for s in range(5)]
    assert [r["config"]["seed"] for r in reporting(runs, 2)] == [2, 3, 4]


def test_calibration_renders_rates_per_setting_and_a_verdict(tmp_path):
    rng = random.Random(3)
    runs = [
        {
            "cell": cell,
            "config": {"seed": 1000 + i},
            "history": [{"test_error": rng.gauss(mu, 0.5)}],
            "diverged": False,
        }
        for cell, mu in (("a", 10.0), ("b", 30.0))
        for i in range(12)
    ]
    payload = {
        "study": "calibration",
        "meta": {"settings": {"a": "setting a", "b": "setting b"}, "seeds": 12, "first_seed": 1000, "splits": 500},
        "runs": runs,
    }
    table, summary = render_calibration(payload, tmp_path)
    assert "setting a" in table and "setting b" in table
    assert {"a/2", "a/3", "a/5", "b/2"} <= set(summary)  # 12 seeds allow up to 6 a side
    per_setting = [v for k, v in summary.items() if k not in ("worst", "pooled", "settled")]
    assert summary["worst"]["welch"] == max(v["welch"] for v in per_setting)
    assert summary["pooled"]["2"]["welch"] == pytest.approx((summary["a/2"]["welch"] + summary["b/2"]["welch"]) / 2)
    assert (tmp_path / "calibration.png").exists()
    assert "calibrated" in calibration_verdict(summary)


# ---------------------------------------------------------------- intervals, Holm, equivalence
@pytest.mark.parametrize("n1,n2", [(2, 3), (4, 4), (5, 3), (8, 8)])
def test_rank_p_is_scipys_exact_mann_whitney_without_ties(n1, n2):
    rng = random.Random(n1 * 7 + n2)
    for _ in range(10):
        a = [rng.gauss(0, 1) for _ in range(n1)]
        b = [rng.gauss(rng.uniform(-2, 2), 1) for _ in range(n2)]
        ref = stats.mannwhitneyu(a, b, alternative="two-sided", method="exact").pvalue
        assert rank_p(a, b) == pytest.approx(ref, rel=1e-9)


def test_rank_p_ties_misses_last_and_is_a_permutation_test():
    inf = math.inf
    # every split of 4 + 4 is equally likely: all-misses against all-reached is the most extreme
    assert rank_p([inf] * 4, [1.0, 2.0, 3.0, 4.0]) == pytest.approx(2 / 70)
    assert rank_p([1.0, 2.0, inf, inf], [1.0, 2.0, inf, inf]) == 1.0
    # ties: against a brute-force permutation test on the difference of mean midranks
    import itertools

    a, b = [1.0, 1.0, 2.0, inf], [2.0, 3.0, inf, inf]
    pooled = a + b
    ranks = [sum(v < x for v in pooled) + (sum(v == x for v in pooled) + 1) / 2 for x in pooled]
    seen = abs(sum(ranks[:4]) - sum(ranks) / 2)
    splits = list(itertools.combinations(range(8), 4))
    extreme = sum(abs(sum(ranks[i] for i in c) - sum(ranks) / 2) >= seen - 1e-12 for c in splits)
    assert rank_p(a, b) == pytest.approx(extreme / len(splits))


def test_shift_interval_is_the_set_of_shifts_the_rank_test_keeps():
    """Moses' interval by its definition: the shifts d for which the exact rank test of a - d
    against b does not reject at 5% (checked on a fine grid of d)."""
    rng = random.Random(3)
    a = [rng.gauss(1.0, 1) for _ in range(6)]
    b = [rng.gauss(0.0, 1) for _ in range(6)]
    est, lo, hi = shift_interval(a, b)
    assert lo <= est <= hi
    kept = [d / 100 for d in range(-600, 800) if rank_p([x - d / 100 for x in a], b) > 0.05]
    assert min(kept) == pytest.approx(lo, abs=0.011) and max(kept) == pytest.approx(hi, abs=0.011)


def test_holm_by_hand():
    assert holm([0.01, 0.04, None, 0.03]) == pytest.approx([0.03, 0.06, None, 0.06])
    assert holm([0.5, 0.001]) == [0.5, 0.002]
    assert holm([None]) == [None]


def test_welch_interval_is_scipys():
    a, b = [1.0, 2.5, 3.0, 2.2], [2.0, 3.0, 4.5]
    d, lo, hi = welch_interval(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (lo, hi) == pytest.approx((ref.low, ref.high), rel=1e-9) and d == pytest.approx(sum(a) / 4 - sum(b) / 3)


def test_decisions_split_cannot_tell_into_equivalent_and_inconclusive():
    near = [10.0, 10.1, 9.9, 10.05, 9.95, 10.02]
    assert decide(*_pc(error_contrast(near, [x + 0.01 for x in near])), ERROR_MARGIN) == "equivalent"
    wide = [8.0, 12.0, 9.0, 11.0]
    assert decide(*_pc(error_contrast(wide, [x + 0.1 for x in wide])), ERROR_MARGIN) == "inconclusive"
    far = [x + 3 for x in near]
    assert decide(*_pc(error_contrast(far, near)), ERROR_MARGIN) == "differs"
    assert decide(None, None, ERROR_MARGIN) == "no test"
    # steps: misses censor, and an interval that cannot be bounded is said open
    c = steps_contrast([100.0, 110.0, math.inf, math.inf], [100.0, 104.0, 108.0, 112.0])
    assert c is not None and math.isinf(c["hi"])
    settle([c], STEPS_MARGIN)
    assert c["decision"] == "inconclusive" and "∞" in said_steps(c, "2 of 4 vs 4 of 4 reached", 1)


def _pc(c):
    return c["p"], c["ci90"]


@pytest.mark.parametrize(
    ("diff", "lo", "hi", "decision", "word"),
    [
        (-1.0, -1.4, -0.6, "differs", "**reproduced**"),  # a gain the size of the paper's
        (-0.4, -0.6, -0.2, "differs", "**partly reproduced (a smaller gain than the paper's)**"),
        (+0.5, +0.2, +0.8, "differs", "**not reproduced (Neumann worse)**"),
        (-0.1, -0.25, +0.05, "equivalent", "**not reproduced (equivalent within ±0.3 points)**"),
        (-0.26, -0.59, +0.08, "inconclusive", "**not reproduced (no gain of the paper's size)**"),
        (-0.6, -2.7, +1.5, "inconclusive", "**inconclusive**"),  # the interval holds the paper's gain
    ],
)
def test_compare_verdict_says_what_the_interval_excludes(diff, lo, hi, decision, word):
    from neumann_repro.studies.compare import verdict as compare_verdict

    c = dict(diff=diff, lo=lo, hi=hi, p_holm=0.01, decision=decision)
    summ = {"t/neumann-default": dict(final_mean=4.2, seeds=4), "t/sgd": dict(final_mean=4.4, seeds=4, vs_neumann=c)}
    text = compare_verdict(summ)
    assert text.endswith(word) and f"{diff:+.2f} points (95%: {lo:+.2f} to {hi:+.2f}" in text
    assert ("the paper's 0.8-point gain lies outside the interval" in text) == (lo > -0.8)


def test_ablation_verdict_tests_both_halves_of_the_pattern_with_holm():
    """Table 4's pattern (quality drops without the regularizers, but stays better than SGD) is two
    contrasts per model, Holm-adjusted together, signed so that positive means 'without' is worse."""
    from neumann_repro.studies.ablation import verdict as ablation_verdict

    def row(m: float) -> dict:
        return dict(final=m, report=[m - 0.1, m, m + 0.1, m + 0.05, m - 0.05])

    summ = {
        "mlp/default (Table 1)": row(30.0),
        "mlp/no regularizers": row(32.0),
        "mlp/SGD+Nesterov (same lr)": row(35.0),
    }
    text = ablation_verdict(summ)
    assert "minus the default +2.00 (95%: +" in text and "(a drop)" in text
    assert "minus SGD+Nesterov at the same lr -3.00" in text and "(better than the baseline)" in text
    assert text.endswith("(Holm over 2 tests)")
    summ["mlp/no regularizers"] = row(30.05)
    assert "(no drop shown)" in ablation_verdict(summ)


def test_contrast_interval_is_welchs_for_two_samples_and_inverts_the_contrast_test():
    """Weights 1, -1: scipy's Welch interval; any weights: moving the estimate to an end of the 95% interval makes
    the generalised test's p exactly 0.05 (the interval is the set of contrasts the test does not reject)."""
    a, b = [4.1, 4.6, 3.9, 4.4], [5.0, 4.2, 5.9, 5.1, 4.8]
    est, lo, hi = contrast_interval([a, b], [1.0, -1.0])
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (est, lo, hi) == pytest.approx((sum(a) / 4 - sum(b) / 5, ci.low, ci.high))
    groups = [[2.9, 3.4, 3.1, 2.7], [6.0, 4.1, 9.3, 5.2], [3.0, 2.8, 3.3, 3.1], [5.5, 6.3, 4.9, 6.0]]
    w = [1.0, -1.0, -1.0, 1.0]
    est, lo, hi = contrast_interval(groups, w)
    assert lo < est < hi
    for end in (lo, hi):
        shifted = [[x - end for x in groups[0]], *groups[1:]]  # the contrast's estimate becomes est - end
        assert contrast_p(shifted, w) == pytest.approx(0.05)
    assert contrast_interval([[1.0], [2.0, 3.0]], [1.0, -1.0]) is None
    assert contrast_interval([[1.0, 1.0], [2.0, 2.0]], [1.0, -1.0]) == (-1.0, -1.0, -1.0)
