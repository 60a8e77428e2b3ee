"""The verdict rule: Welch's t-test against scipy's own, its calibration on A/A draws, and the
words a verdict says."""

from __future__ import annotations

import random

import pytest
from neumann_repro.studies.calibration import false_positive_rates, render_calibration
from neumann_repro.studies.calibration import verdict as calibration_verdict
from neumann_repro.verdicts import compare, contrast_p, judge, reporting, two_se, welch_p

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
    assert welch_p([1.0, 1.0], [2.0, 2.0]) == 0.0


def test_welch_is_calibrated_and_the_old_rule_is_not_on_normal_a_a_draws():
    """Split many draws of one normal distribution into disjoint groups: Welch's test at 5% calls
    about 5% of the pairs different (a little fewer: it is conservative at small samples), the
    two-standard-error rule about twice as many at 3 seeds a side."""
    rng = random.Random(0)
    values = [rng.gauss(28.5, 1.6) for _ in range(600)]
    for n in (2, 3, 5):
        rates = false_positive_rates(values, n, splits=2000, seed=n)
        assert 0.02 <= rates["welch"] <= 0.06, (n, rates)
    assert false_positive_rates(values, 3, splits=2000)["two_se"] > 0.09


def test_judge_says_which_way_and_cites_its_test():
    low, high = [1.0, 1.1, 0.9], [5.0, 5.2, 4.8]
    assert compare(low, high)[0] == "better"
    assert compare(high, low)[0] == "worse"
    assert compare(low, high, lower_is_better=False)[0] == "worse"
    assert judge(low, high).startswith("better (Welch p = ")
    assert "3 vs 3 seeds" in judge(low, high)
    assert judge([1.0, 2.0], [1.5, 1.4]).startswith("cannot be told apart")
    assert "needs at least 2 reporting seeds" in judge([1.0], [1.0, 2.0])
    assert two_se(low, high) and not two_se([1.0, 2.0], [1.5, 1.4])


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
