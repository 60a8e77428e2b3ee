"""The rate-advice table (``rates``): per batch, the largest rate with no failed run at or below it."""

from __future__ import annotations

from neumann_repro.rates import rate_table, tally


def _run(batch: float, lr: float, final: float, diverged: bool = False, epochs: int = 30, **cfg) -> dict:
    config = {"optimizer": "neumann", "model": "mlp", "batch": batch, "lr": lr, "repulsive_weight": 0.0, **cfg}
    config = {k: v for k, v in config.items() if v is not None}
    history = [] if diverged else [{"val_error": final}]
    config["epochs"] = epochs
    steps = 7 if diverged else epochs * 10  # a diverged run stops early: its planned length is what counts
    return dict(config=config, history=history, diverged=diverged, steps=steps, steps_per_epoch=10)


def test_the_safe_rate_stops_below_the_first_failure_and_ignores_short_and_other_runs():
    runs = [
        _run(128, 0.1, 5.0),
        _run(128, 0.3, 6.0),
        _run(128, 0.3, 5.5),
        _run(128, 1.0, 90.0),  # a collapse to chance
        _run(128, 1.0, 7.0),
        _run(128, 3.0, 5.0),  # safe alone, but above a failure: not advised
        _run(128, 10.0, 0.0, diverged=True),
        _run(128, 0.3, 95.0, epochs=5),  # too short to count
        _run(128, 0.3, 95.0, repulsive_weight=1e-5),  # not the default optimizer
        _run(128, 0.3, 95.0, repulsive_weight=None),  # no repulsive_weight: the paper's 1e-5, not the default
        _run(128, 0.3, 95.0, regularizer_schedule="lr"),  # a scaled-regularizer variant
        _run(128, 0.3, 95.0, momentum=0.9),  # ingredients' constant mu, not the default's ramp
        _run(128, 0.3, 95.0, resets=False),  # ingredients' no resets
        _run(256, 0.1, 95.0),
        *[_run(256, 0.03, 5.0) for _ in range(4)],
    ]
    counts = tally([{"runs": runs}])
    assert counts[128][0.3] == (2, 0) and counts[128][1.0] == (2, 1) and counts[128][10.0] == (1, 1)
    table = rate_table([{"runs": runs}])
    assert "| 128 | 0.3 | 2 | 1: 1 / 2 |" in table
    assert "| 256 | 0.03 | 4 | 0.1: 1 / 1 |" in table
