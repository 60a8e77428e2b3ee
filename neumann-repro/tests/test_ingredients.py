"""The ingredients study on a synthetic runner whose answers are known (training is not run): a
run reaches the target after S_need steps, S_need = S_min (1 + B_noise / B) stretched by a bowl in
log10(lr) and by a factor per ingredient. Here dropping the burn-in costs 1.5x the steps, a constant
momentum saves 0.7x, and nothing else changes anything; evaluation at w is 1.2x slower."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from neumann_repro import ladder
from neumann_repro.runner import Runner, config_key
from neumann_repro.studies import ingredients as ing
from neumann_repro.study import Settings
from neumann_repro.train import NO_RESETS, make_optimizer
from test_critical_batch import run_record

S_MIN, B_NOISE = 300.0, 256.0


def factor(cfg) -> float:
    if cfg["optimizer"] != "neumann":
        return 1.0
    f = 1.0
    if cfg.get("burn_in_epochs") == 0 and "warmup_frac" not in cfg and cfg.get("warmup_epochs", 0) == 0:
        f *= 1.5
    if cfg.get("momentum") == 0.9:
        f *= 0.7
    return f


def s_need(cfg) -> float:
    bowl = 1 + math.log10(cfg["lr"] / (cfg["batch"] / 256) ** 0.5) ** 2
    return S_MIN * (1 + B_NOISE / cfg["batch"]) * bowl * factor(cfg) * (1 + 0.01 * cfg["seed"])


class Synthetic(Runner):
    def __init__(self, tmp_path) -> None:
        super().__init__(tmp_path, progress=False)
        self.rounds: list[list[dict]] = []

    def data(self, task):  # the study reads only the training set's size
        return SimpleNamespace(x_train=range(36000))

    def run_all(self, configs, desc="runs"):
        self.rounds.append(list(configs))
        out = []
        for c in configs:
            need = s_need(c)
            if "steps" in c:
                pts = sorted({max(1, round(c["steps"] * k / c["evals"])) for k in range(1, c["evals"] + 1)})
                hist = [dict(step=s, val_error=10.0 * need / s, test_error=10.0 * need / s) for s in pts]
                steps = c["steps"]
            else:  # a fixed epoch budget: the final error falls with the steps there are per need
                spe = 36000 // c["batch"]
                steps = c["epochs"] * spe
                hist = [
                    dict(epoch=e, val_error=10.0 * need / (e * spe), test_error=10.0 * need / (e * spe))
                    for e in range(1, c["epochs"] + 1)
                ]
            if c.get("eval_at_w"):
                for h in hist:
                    h["val_error_at_w"] = 1.2 * h["val_error"]
                    h["test_error_at_w"] = 1.2 * h["test_error"]
            out.append(run_record(c, hist, steps))
        return out


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ingredients")
    mp = pytest.MonkeyPatch()
    mp.setattr(ing, "CB_FULL", {**ing.CB_FULL, "target": 10.0})
    mp.setattr(ing, "FIXED", {**ing.FIXED, "epochs": 6})
    runner = Synthetic(tmp_path)
    ing.ingredients(runner, Settings(quick=False, epochs=1))  # epochs: not the documented run (no docs write)
    mp.undo()
    payload = json.loads((tmp_path / "ingredients" / "results.json").read_text())
    return runner, payload


def test_seeds_tune_and_report_apart(study):
    runner, _ = study
    seen = [c for r in runner.rounds for c in r]
    assert {c["seed"] for c in seen} == {0, 1, *ladder.report_seeds()}
    # the reporting seeds run only at a cell's chosen budget and rate, after both tuning seeds ran it,
    # and in a later round than every tuning run of their cell
    for k, r in enumerate(runner.rounds):
        for c in r:
            if c["seed"] >= 2:
                assert all(any(o == {**c, "seed": t} for o in seen) for t in (0, 1))
                later = [o for rr in runner.rounds[k + 1 :] for o in rr if o["seed"] < 2]
                assert not any(_cell_of(o) == _cell_of(c) for o in later)


def _cell_of(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("steps", "lr", "seed")}


def test_every_variant_differs_from_the_default_in_one_thing(study):
    runner, _ = study
    ladder = [c for r in runner.rounds for c in r if "steps" in c and c["batch"] == 256]
    keys = {frozenset((k, str(v)) for k, v in c.items() if k not in ("steps", "lr", "seed")) for c in ladder}
    default = dict(ing.base_cfg(), **ing._neumann_cfg("default", False)[0])
    assert default["eval_at_w"] and default["repulsive_weight"] == 0.0
    # default, no-cubic, no-resets, constant-mu, no-burn-in, warm-up, bare, SGD: at-w shares the default's runs
    assert len(keys) == 8


def test_cells_searching_the_same_runs_train_them_once(study):
    runner, _ = study
    for r in runner.rounds:
        assert len({config_key(c) for c in r}) == len(r)


def test_steps_and_verdicts_follow_the_known_answers(study):
    _, payload = study
    summ = payload["summary"]
    c = summ["contrasts"]  # the default's steps over the variant's: above 1, the default is slower
    for b in ("64", "256", "1024"):
        assert c["no-burn-in"][b]["decision"] == "differs" and c["no-burn-in"][b]["ratio"] < 1
        assert c["constant-mu"][b]["decision"] == "differs" and c["constant-mu"][b]["ratio"] > 1
        assert c["at-w"][b]["decision"] == "differs" and c["at-w"][b]["ratio"] < 1  # read at w, 1.2x the steps
        for same in ("no-cubic", "no-resets"):  # identical runs: no difference, and equivalent within 10%
            assert c[same][b]["ratio"] == 1.0 and c[same][b]["p"] == 1.0
            assert c[same][b]["decision"] == "equivalent"
        assert c["no-burn-in"][b]["ratio"] == pytest.approx(1 / 1.5, rel=0.1)
        assert c["constant-mu"][b]["ratio"] == pytest.approx(1 / 0.7, rel=0.1)
        assert c["no-burn-in"][b]["lo"] <= c["no-burn-in"][b]["ratio"] <= c["no-burn-in"][b]["hi"] < 1
    # steps to the target fall with the batch as S_min (1 + B_noise / B) does
    steps = summ["steps"]["default"]
    assert steps["64"] > steps["256"] > steps["1024"]
    verdict = ing.verdict(summ)
    assert "no burn-in: the default needs fewer steps at batch 64, 256, 1024" in verdict
    assert "no cubic term (alpha = 0): within ±10% at batch 64, 256, 1024" in verdict


def test_fixed_epoch_table_has_every_variant_and_reads_at_w_from_the_default(study):
    _, payload = study
    fixed = payload["summary"]["fixed"]
    assert set(fixed) == set(ing.VARIANTS)
    assert fixed["at-w"]["lr"] == fixed["default"]["lr"]
    assert fixed["at-w"]["test_mean"] == pytest.approx(1.2 * fixed["default"]["test_mean"], rel=1e-9)
    assert not any(r["cell"] == "fixed/at-w" for r in payload["runs"])
    # the default minus the variant: positive where the default is worse
    no_burn, const = fixed["no-burn-in"]["vs_default"], fixed["constant-mu"]["vs_default"]
    assert no_burn.startswith("-") and "the default better" in no_burn
    assert const.startswith("+") and "the default worse" in const


def test_variant_configs_reach_the_optimizer():
    import torch

    model = torch.nn.Linear(3, 2)
    for cfg, check in (
        (dict(resets=False), lambda g: g["reset_steps"] == NO_RESETS),
        (dict(momentum=0.9), lambda g: g["momentum_bounds"] == (0.9, 0.9)),
        (dict(burn_in_epochs=0), lambda g: g["burn_in_steps"] == 0),
        (dict(cubic_weight=0.0), lambda g: g["cubic_weight"] == 0.0),
    ):
        opt = make_optimizer(dict(optimizer="neumann", lr=0.1, repulsive_weight=0.0, **cfg), model, 10)
        assert check(opt.param_groups[0]), cfg


def test_one_batch_size_is_drawn_as_bars_and_one_seed_gives_no_verdict(tmp_path):
    mp = pytest.MonkeyPatch()
    one = {**ing.CB_FULL, "target": 10.0, "batches": [256], "fixed": {**ing.FIXED, "epochs": 6}, "n_report": 1}
    mp.setattr(ing, "settings", lambda s: one)
    try:
        ing.ingredients(Synthetic(tmp_path), Settings(quick=False, epochs=1))
    finally:
        mp.undo()
    payload = json.loads((tmp_path / "ingredients" / "results.json").read_text())
    assert payload["meta"]["batches"] == [256]
    verdict = ing.verdict(payload["summary"])
    assert "no verdict (fewer than 2 reporting seeds a side)" in verdict and "inconclusive" not in verdict
    drawn = []
    mp.setattr(ing, "save_figure", lambda fig, path: drawn.append(fig))
    try:
        ing._plot(
            payload["meta"],
            ing.cell_results(
                ing.cells_of(payload["runs"]),
                list(payload["meta"]["variants"]),
                [256],
                10.0,
                payload["meta"]["metrics"],
            ),
            tmp_path,
        )
    finally:
        mp.undo()
    ax = drawn[0].axes[0]
    assert len(ax.patches) == len(payload["meta"]["variants"])  # one bar per variant
    assert "fewer is better" in ax.get_xlabel() and ax.get_xscale() == "linear"
