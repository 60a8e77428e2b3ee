"""The critical-batch study's search and rules on a synthetic runner whose answers are known: a run
reaches the target once it has taken S_need(B, lr) steps, S_need = S_min (1 + B_noise / B) stretched
by a bowl in log10(lr) around the best rate (Shallue et al.'s hyperbola; training is not run)."""

from __future__ import annotations

import math

import pytest
from neumann_repro import ladder
from neumann_repro.runner import Runner
from neumann_repro.studies import critical_batch as cb
from neumann_repro.study import Settings

S_MIN, B_NOISE, BEST_LR = 300.0, 256.0, {"sgd": 0.3, "adamw": 3e-3}


def s_need(cfg) -> float:
    opt = cfg["optimizer"]
    best = BEST_LR.get(opt, 1.0)
    return S_MIN * (1 + B_NOISE / cfg["batch"]) * (1 + (math.log10(cfg["lr"] / best)) ** 2)


class Synthetic(Runner):
    def __init__(self, tmp_path) -> None:
        super().__init__(tmp_path, progress=False)
        self.seen: list[dict] = []

    def run_all(self, configs, desc="runs"):
        out = []
        for c in configs:
            self.seen.append(c)
            need = s_need(c) * (1 + 0.001 * c["seed"])
            steps = c["steps"]
            pts = sorted({max(1, round(steps * k / c["evals"])) for k in range(1, c["evals"] + 1)})
            hist = [dict(step=s, val_error=10.0 * need / s, test_error=10.0 * need / s) for s in pts]
            if c.get("noise_scale"):
                for h in hist:
                    h.update(trace_sigma=B_NOISE * 2.0, grad_sq=2.0)
            out.append(run_record(c, hist, steps))
        return out


def run_record(cfg: dict, history: list[dict], steps: int, train_size: int = 36000) -> dict:
    """What ``train.run`` returns for a finished, not diverged run."""
    return dict(
        config=cfg,
        history=history,
        diverged=False,
        seconds=0.0,
        train_size=train_size,
        steps_per_epoch=train_size // cfg["batch"],
        steps=steps,
    )


@pytest.fixture
def study(tmp_path, monkeypatch):
    monkeypatch.setattr(cb, "VARIANTS", ["sgd", "adamw"])
    monkeypatch.setattr(cb, "FULL", {**cb.FULL, "target": 10.0})
    runner = Synthetic(tmp_path)
    cb.critical_batch(runner, Settings(quick=False, epochs=1))  # epochs: not a documented run (no docs write)
    payload = __import__("json").loads((tmp_path / "critical-batch" / "results.json").read_text())
    return runner, payload


def test_every_cell_finds_the_smallest_reaching_budget_at_a_tuned_interior_rate(study):
    _, payload = study
    target = payload["meta"]["target"]
    cells = {}
    for r in payload["runs"]:
        cells.setdefault(r["cell"], []).append(r)
    for name in ("sgd", "adamw"):
        for b in cb.FULL["batches"]:
            res = cb.cell_result(cells[f"{name}/{b}"], target)
            best = res.smallest
            grid_best = ladder.lr_at(ladder.lr_index(BEST_LR[name]))  # the fine grid's rate nearest the bowl's floor
            assert best is not None and best.lr == grid_best and best.interior
            # the worse tuning seed (seed 1) decides: the smallest rung >= its S_need
            need = s_need({"optimizer": name, "batch": b, "lr": grid_best}) * 1.001
            assert best.steps == 2 ** math.ceil(math.log2(need))
            assert res.verified(cb.FULL["first_budget"])  # and the rung below was tuned and failed
            # each reporting seed: the first evaluation point at or past its own S_need
            pts = [round(best.steps * k / cb.EVALS) for k in range(1, cb.EVALS + 1)]
            want = {
                s: min((p for p in pts if p >= need / 1.001 * (1 + 0.001 * s)), default=None)
                for s in ladder.report_seeds()
            }
            assert best.hits == want


def test_critical_batch_rule_and_noise_scale_in_the_summary(study, tmp_path):
    _, payload = study
    _, summary = cb.render_critical_batch(payload, tmp_path / "render")
    assert (tmp_path / "render" / "critical_batch.png").stat().st_size > 10_000
    steps = {int(b): v for b, v in summary["sgd"]["steps"].items()}
    for b in steps:  # the rule, checked against its statement
        ok = all(steps[c] * c <= 2 * min(steps[a] * a for a in steps if a <= c) for c in steps if c <= b)
        assert ok == (b <= summary["sgd"]["critical"])
    # S = S_min (1 + 256/B): half the ideal speed-up is lost near B = B_noise, between 256 and 1024
    assert summary["sgd"]["critical"] in (256, 1024)
    assert summary["sgd"]["noise_scale"] == pytest.approx(B_NOISE)


def test_critical_batch_size_rule():
    assert cb.critical_batch_size({16: 1000.0, 64: 250.0, 256: 70.0, 1024: 40.0}) == 256
    assert cb.critical_batch_size({16: 1000.0, 64: 600.0, 256: 100.0}) == 16  # the first failure ends it
    # a slow smallest batch does not stretch the range: measured from the most efficient one
    assert cb.critical_batch_size({16: 4000.0, 64: 250.0, 256: 70.0, 1024: 40.0}) == 256
    assert cb.critical_batch_size({}) is None


def test_start_budget_is_a_ladder_rung():
    st = cb.FULL
    for b in st["batches"]:
        s = ladder.start_budget(st, b)
        assert s >= st["first_budget"] and math.log2(s / st["first_budget"]).is_integer()
    assert ladder.start_budget(st, 16) == 8192 and cb.start_budget(st, 4096) == 64
