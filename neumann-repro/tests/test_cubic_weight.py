"""The cubic-weight study's pieces on made-up runs: the largest stable rate, epochs to a target, and
the default rule (stated before the runs) applied to made-up cells."""

from __future__ import annotations

import pytest
from neumann_repro.studies import cubic_weight as cw


def _run(lr: float, seed: int, diverged: bool = False, val: tuple[float, ...] = (30.0, 9.0, 7.0, 5.5)) -> dict:
    hist = [dict(epoch=k + 1, val_error=v) for k, v in enumerate(val)]
    return dict(config=dict(lr=lr, seed=seed), diverged=diverged, history=hist)


def test_the_largest_stable_rate_is_below_the_first_divergence_on_any_tuning_seed():
    runs = [_run(1.0, 0), _run(1.0, 1), _run(1.8, 0), _run(1.8, 1), _run(3.2, 0), _run(3.2, 1, diverged=True)]
    runs += [_run(5.6, 0), _run(5.6, 1), _run(3.2, 2, diverged=True)]  # (a reporting seed does not count)
    assert cw.largest_stable(runs, 2) == (1.8, True)
    assert cw.largest_stable(runs[:4], 2) == (1.8, False)  # no divergence seen: the bracket is open


def test_epochs_to_a_target_is_the_first_epoch_at_or_below_it():
    run = _run(1.0, 2, val=(30.0, 8.0, 6.5, 6.0))
    assert cw.epochs_to(run, 8.0) == 2 and cw.epochs_to(run, 6.0) == 4 and cw.epochs_to(run, 5.0) is None
    assert cw._median_hit([2, 3, None]) == 3 and cw._median_hit([2, None, None]) is None


def _row(mean: float, spread: float = 0.05) -> dict:
    return dict(
        report=[mean + d for d in (-spread, 0.0, spread, spread / 2, -spread / 2, 0.01, -0.01, 0.02)], test_mean=mean
    )


def _rows(by_alpha: dict[float, tuple[float, float]]) -> dict:
    """alpha -> (mean at 256, mean at 1,024)."""
    return {b: {a: _row(m[i]) for a, m in by_alpha.items()} for i, b in enumerate((256, 1024))}


@pytest.mark.parametrize(
    ("cells", "default", "rule"),
    [
        # 1e-1 better at 1,024 and worse nowhere; alpha = 0 equivalent: the gain wins (rule 1)
        ({0.0: (5.0, 6.0), 1e-7: (5.0, 6.0), 1e-1: (5.0, 5.0)}, 1e-1, "rule 1"),
        # 1e-1 better at 1,024 but worse at 256: not a default; alpha = 0 equivalent everywhere (rule 2)
        ({0.0: (5.0, 6.0), 1e-7: (5.0, 6.0), 1e-1: (6.0, 5.0)}, 0.0, "rule 2"),
        # alpha = 0 worse at 1,024: nothing moves (rule 3)
        ({0.0: (5.0, 7.0), 1e-7: (5.0, 6.0), 1e-1: (5.0, 6.0)}, 1e-7, "rule 3"),
    ],
)
def test_the_default_rule(cells, default, rule):
    alpha, why = cw.decide_default(_rows(cells))
    assert alpha == default and rule in why, why


def test_the_family_is_every_alpha_at_every_batch_against_1e7():
    rows = _rows({a: (5.0, 6.0) for a in cw.ALPHAS})
    cs = cw.contrasts(rows)
    assert len(cs) == 2 * (len(cw.ALPHAS) - 1) and all(c["decision"] == "equivalent" for c in cs.values())
