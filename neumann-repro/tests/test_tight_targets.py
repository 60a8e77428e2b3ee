"""The tight-targets study on a synthetic runner (critical-batch's): each target's ladder search finds
its own smallest budget, tighter targets need more steps, and searches of several targets share runs
(through the run cache; each config stored once with every cell it serves). Also the SGD warm-up matched to
Neumann's schedule, against its formula."""

from __future__ import annotations

import json
import math

import pytest
from neumann_repro.studies import tight_targets as tt
from neumann_repro.study import Settings
from neumann_repro.train import neumann_matched_factor
from test_critical_batch import Synthetic


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tight")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tt, "VARIANTS", {k: tt.VARIANTS[k] for k in ("sgd", "adamw")})
        mp.setattr(tt, "TARGETS", (10.0, 5.0))
        mp.setattr(tt, "BATCHES", [64, 1024])
        runner = Synthetic(tmp_path)
        tt.tight_targets(runner, Settings(quick=False, epochs=1))  # epochs: not a documented run (no docs write)
    payload = json.loads((tmp_path / "tight-targets" / "results.json").read_text())
    return runner, payload


def test_each_target_finds_its_budget_and_tighter_needs_more_steps(study):
    _, payload = study
    cells = tt.cells_of(payload["runs"])
    for name in ("sgd", "adamw"):
        for b in (64, 1024):
            loose = tt.results_at(cells, 10.0, [name], [b])[name][b]
            tight = tt.results_at(cells, 5.0, [name], [b])[name][b]
            assert loose.smallest is not None and tight.smallest is not None
            assert loose.verified(64) and tight.verified(64)
            assert tt.median_steps(tight) > tt.median_steps(loose)


def test_targets_share_runs_and_the_payload_stores_each_once(study):
    runner, payload = study
    keys = {json.dumps(c, sort_keys=True) for c in runner.seen}  # (the run cache trains each once)
    shared = [r for r in payload["runs"] if len({c.split("/")[0] for c in r["cells"]}) > 1]
    assert shared and len(payload["runs"]) == len(keys)
    assert all(r["cell"] == r["cells"][0] for r in payload["runs"])


def test_the_matched_warm_up_follows_neumanns_effective_step():
    spe = 100
    burn_in = [neumann_matched_factor(k, spe) for k in range(5 * spe)]
    assert burn_in == [pytest.approx(0.1)] * (5 * spe)  # plain SGD through the burn-in: lr, not lr / 0.1
    for epochs in (1, 4, 8.9):  # then lr / (1 - mu_t) over lr / (1 - 0.9), mu_t = 1 - 1 / (1 + t / tau)
        t = int(epochs * spe)
        mu = 1 - 1 / (1 + t / spe)
        assert neumann_matched_factor(5 * spe + t - 1, spe) == pytest.approx(0.1 / (1 - mu))
    assert neumann_matched_factor(14 * spe, spe) == 1.0 and neumann_matched_factor(50 * spe, spe) == 1.0
    assert math.isclose(neumann_matched_factor(5 * spe + 9 * spe - 1, spe), 1.0)


def test_the_matched_warm_up_follows_a_shorter_burn_in_too():
    spe = 50
    assert neumann_matched_factor(spe - 1, spe, burn_in_epochs=1) == pytest.approx(0.1)
    assert neumann_matched_factor(spe, spe, burn_in_epochs=1) == pytest.approx(0.1 * (1 + 1 / spe))
    assert neumann_matched_factor(10 * spe - 1, spe, burn_in_epochs=1) == pytest.approx(1.0)


def test_no_budget_is_longer_than_64_epochs_and_the_top_rung_is_near_it():
    from neumann_repro.ladder import max_budget

    st = tt.settings(Settings(quick=False))
    for b in tt.BATCHES:
        epochs = max_budget(st, b, 36_000) * b / 36_000
        assert tt.MAX_EPOCHS / 2 < epochs <= tt.MAX_EPOCHS


def test_the_matched_warm_up_recipe_in_when_to_use_is_the_studys():
    """docs/WHEN_TO_USE.md's two lines for SGD+Nesterov with Neumann's warm-up give, step by step, the rate the
    study's "sgd-matched" runs use: the matched factor times the cosine decay (no other warm-up)."""
    from pathlib import Path

    import torch
    from neumann_repro.train import lr_factor

    doc = (Path(__file__).resolve().parents[2] / "docs" / "WHEN_TO_USE.md").read_text()
    block = doc.split("To give SGD+Nesterov Neumann's warm-up", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    lr = 0.5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr, momentum=0.9, nesterov=True)
    ns = dict(math=math, LambdaLR=torch.optim.lr_scheduler.LambdaLR, opt=opt, steps_per_epoch=2, total=400)
    exec(compile("\n".join(x.strip() for x in block.splitlines()), "WHEN_TO_USE.md", "exec"), ns)
    rates = []
    for _ in range(ns["total"]):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        ns["sched"].step()
    want = [lr * neumann_matched_factor(k, 2) * lr_factor(k, 400, 0) for k in range(400)]
    assert rates == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert rates[0] == pytest.approx(0.1 * lr) and max(rates) > 0.9 * lr  # a tenth in the burn-in, then SGD's own


def _c(ratio: float, decision: str) -> dict:
    return dict(ratio=ratio, lo=ratio * 0.9, hi=ratio * 1.1, p=0.01, p_holm=0.02, decision=decision)


@pytest.mark.parametrize(
    ("sgd", "matched", "said"),
    [
        (_c(0.6, "differs"), _c(0.95, "equivalent"), "the edge over SGD+Nesterov is the schedule"),
        (_c(0.6, "differs"), _c(0.9, "inconclusive"), "the edge over SGD+Nesterov is the schedule"),
        (_c(0.6, "differs"), _c(0.7, "differs"), "the edge is more than the schedule"),
        (_c(1.0, "equivalent"), _c(1.3, "differs"), None),  # no edge over SGD+Nesterov to explain
    ],
)
def test_verdict_says_whether_the_edge_is_the_schedule(sgd, matched, said):
    summ = {
        "5": {
            "fewest": {"1024": "neumann-default"},
            "contrasts": {"sgd": {"1024": sgd}, "sgd-matched": {"1024": matched}},
        }
    }
    text = tt.verdict(summ)
    assert text.startswith("5% at batch 1024: fewest Neumann") and f"x{matched['ratio']:.2f}" in text
    for claim in ("the edge over SGD+Nesterov is the schedule", "the edge is more than the schedule"):
        assert (claim in text) == (claim == said), (claim, text)
