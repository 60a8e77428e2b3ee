"""The ladder protocol (neumann_repro.ladder) on synthetic runs whose answers are known: a run reaches
the target after S_need(lr) steps, a bowl in log10(lr) around 1.0, and diverges at rates from a
cliff on where its seed says (training is not run)."""

from __future__ import annotations

import math

import pytest
from neumann_repro import ladder

S_MIN = 300.0


def run(cfg: dict, cliff: dict[int, float]) -> dict:
    need = S_MIN * (1 + math.log10(cfg["lr"]) ** 2) * (1 + 0.001 * cfg["seed"])
    pts = [round(cfg["steps"] * k / 32) for k in range(1, 33)]
    diverged = cfg["lr"] >= cliff.get(cfg["seed"], math.inf)
    hist = [dict(step=s, val_error=10.0 * need / s) for s in pts]
    if diverged:
        hist = hist[:2]
    return dict(config=cfg, history=hist, diverged=diverged)


def search(cliff: dict[int, float], n_report: int = 4) -> tuple[ladder.Search, dict[int, list[dict]]]:
    x = ladder.Search("cell", {"batch": 256}, 1.0, 1024, 64, 2**14, 10.0, n_report=n_report)
    runs: dict[int, list[dict]] = {}
    while need := x.plan(runs):
        for c in need:
            runs.setdefault(c["steps"], []).append(run(c, cliff))
    return x, runs


def test_fine_grid_has_four_rates_per_decade():
    assert [ladder.lr_at(i) for i in range(-4, 5)] == [0.1, 0.18, 0.32, 0.56, 1.0, 1.8, 3.2, 5.6, 10.0]
    assert all(ladder.lr_index(ladder.lr_at(i)) == i for i in range(-20, 20))


def test_a_rate_one_tuning_seed_diverges_at_is_never_chosen():
    # seed 0 alone would pick 1.0 (the bowl's floor); seed 1 diverges there, so the worse seed decides
    _, runs = search({1: 1.0})
    res = ladder.cell_result([r for rs in runs.values() for r in rs], 10.0)
    best = res.smallest
    assert best is not None and best.lr == 0.56 and best.interior
    assert best.next_up() == "1 diverged (1 of 2 tuning seeds)"
    _, clean = search({})
    assert ladder.cell_result([r for rs in clean.values() for r in rs], 10.0).smallest.lr == 1.0  # type: ignore[union-attr]


def test_the_reporting_seeds_choose_nothing_and_their_misses_are_censored():
    # every reporting seed diverges: the budget and rate are those the tuning seeds chose, and the
    # seeds report misses (inf), not an imputed number of steps
    _, runs = search({s: 0.0 for s in ladder.report_seeds(4)}, n_report=4)
    _, clean = search({}, n_report=4)
    a = ladder.cell_result([r for rs in runs.values() for r in rs], 10.0)
    b = ladder.cell_result([r for rs in clean.values() for r in rs], 10.0)
    assert (a.smallest.steps, a.smallest.lr) == (b.smallest.steps, b.smallest.lr)  # type: ignore[union-attr]
    assert a.report == [math.inf] * 4 and a.smallest.n_reached == 0  # type: ignore[union-attr]
    assert all(math.isfinite(v) for v in b.report) and len(b.report) == 4
    # the smallest reaching budget: the tuning seeds' worse one needs S_need(1.0) * 1.001 steps
    assert b.smallest.steps == 2 ** math.ceil(math.log2(S_MIN * 1.001))  # type: ignore[union-attr]
    assert b.verified(64)
    # and nothing the reporting seeds ran was at another budget or rate
    rep = [r for rs in runs.values() for r in rs if r["config"]["seed"] >= 2]
    assert {(r["config"]["steps"], r["config"]["lr"]) for r in rep} == {(a.smallest.steps, a.smallest.lr)}  # type: ignore[union-attr]


def test_a_cell_that_never_reaches_has_no_reporting_runs():
    x, runs = search({0: 0.0, 1: 0.0})  # the tuning seeds diverge everywhere
    assert x.done and ladder.cell_result([r for rs in runs.values() for r in rs], 10.0).smallest is None
    assert max(runs) == 2**14 and not any(r["config"]["seed"] >= 2 for rs in runs.values() for r in rs)


@pytest.mark.parametrize("batch,want", [(16, 8192), (256, 512), (4096, 64)])
def test_start_budget(batch, want):
    st = dict(first_budget=64, max_budget=2**17, start_examples=150_000)
    assert ladder.start_budget(st, batch) == want
