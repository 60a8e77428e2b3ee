"""The reproduction CLI on tiny settings: outputs, caching/resume, task loaders."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mnist1d")
pytest.importorskip("matplotlib")

from neumann_repro import runner as runner_mod
from neumann_repro.cli import main
from neumann_repro.tasks import load_cifar10, load_task, make_model
from neumann_repro.tuning import FULL_PROTOCOL, Protocol, choose, lr_at, lr_index, summarize, tune


def _no_training(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("trained although the results were cached")

    monkeypatch.setattr(runner_mod, "run", refuse)


def test_compare_quick_writes_table_results_and_plot(tmp_path, capsys):
    assert main(["compare", "--quick", "--epochs", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    study = tmp_path / "compare"
    table = (study / "table.md").read_text()
    for name in ("Neumann", "SGD+Nesterov", "Adam", "RMSprop"):
        assert name in table
    res = json.loads((study / "results.json").read_text())
    per_opt = {}
    for r in res["runs"]:
        per_opt.setdefault(r["config"]["optimizer"], set()).add(r["config"]["lr"])
        assert r["train_size"] == 3600 and r["steps"] == 2 * r["steps_per_epoch"] == 2 * (3600 // 128)
    assert set(per_opt) == {"neumann", "sgd", "adam", "rmsprop", "rmsprop-inception", "neumann-adaptive"}
    # a 3-point grid, one extension at most, two midpoints around the grid's choice
    assert all(3 <= len(lrs) <= 6 for lrs in per_opt.values())
    assert all(len(r["history"]) == 2 for r in res["runs"] if not r["diverged"])
    assert (study / "test_error.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "compare" in out
    # one seed, the tuning one: the verdict says there is none, and why
    assert "**no verdict** (1 seed a side, all of them tuning)" in out and "cannot tell" not in out
    assert not (tmp_path / "docs").exists()  # quick runs never write the committed results


def test_batch_scaling_quick_has_every_optimizer(tmp_path):
    assert main(["batch-scaling", "--quick", "--epochs", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    res = json.loads((tmp_path / "batch-scaling" / "results.json").read_text())
    opts = {
        (r["config"]["optimizer"], r["config"].get("regularizer_schedule"), r["config"].get("repulsive_weight"))
        for r in res["runs"]
    }
    assert opts == {
        ("neumann", None, 0.0),  # the default (no repulsive term)
        ("neumann", None, None),  # the paper's Table 1
        ("neumann", "lr", None),
        ("sgd", None, None),
        ("adamw", None, None),
        ("lars", None, None),
        ("lamb", None, None),
    }
    assert {r["config"]["batch"] for r in res["runs"]} == {64, 256}
    table = (tmp_path / "batch-scaling" / "table.md").read_text()
    for label in (
        "LARS",
        "LAMB",
        "AdamW",
        "SGD+Nesterov",
        "Neumann (default: no repulsive term)",
        "Neumann, paper's regularizers",
    ):
        assert f"| {label} |" in table


def test_finished_runs_are_cached_and_resumed(tmp_path, monkeypatch):
    # one process: the patched run below must see every training (workers would not)
    args = ["compare", "--quick", "--epochs", "1", "--out", str(tmp_path), "--no-progress", "--jobs", "1"]
    main(args)
    cached = sorted((tmp_path / "cache").glob("*.json"))
    assert len(cached) >= 12
    # an interrupted study: drop two results, then rerun: only those two are trained again
    cached[0].unlink()
    cached[1].unlink()
    calls = []
    real_run = runner_mod.run
    monkeypatch.setattr(runner_mod, "run", lambda *a, **k: calls.append(1) or real_run(*a, **k))
    main(args)
    assert len(calls) == 2


def test_committed_results_are_a_cache_and_the_report_renders_them_without_training(tmp_path, monkeypatch):
    out = tmp_path / "runs"
    main(["compare", "--quick", "--epochs", "1", "--out", str(out), "--no-progress"])
    results = tmp_path / "docs" / "results"
    results.mkdir(parents=True)
    payload = json.loads((out / "compare" / "results.json").read_text())
    (results / "compare.json").write_text(json.dumps(payload))
    shutil.rmtree(out)  # a fresh clone: no run cache, only the committed results
    _no_training(monkeypatch)
    report = tmp_path / "docs" / "REPRODUCTION.md"
    main(["report", "--results", str(results), "--out", str(out), "--report", str(report)])
    text = report.read_text()
    assert "## compare (Table 2)" in text and "Verdict (rule-based):** mlp-4k: Neumann" in text
    assert "Tuning protocol" in text and "Not run yet" in text  # other studies have no results here
    assert (tmp_path / "docs" / "img" / "compare-test_error.png").stat().st_size > 1000
    # the study itself reruns from the committed runs, without training either
    main(["compare", "--quick", "--epochs", "1", "--out", str(out), "--results", str(results), "--no-progress"])
    assert json.loads((out / "compare" / "results.json").read_text())["runs"] == payload["runs"]


class _SyntheticRunner:
    """Runs nothing: the validation error of a config is a bowl in log10(lr) with its bottom at
    ``best`` (checks the protocol's logic, not training)."""

    def __init__(self, best: float) -> None:
        self.best, self.seen = best, []

    def run_all(self, configs, desc=""):
        out = []
        for c in configs:
            self.seen.append(c)
            err = 10 + (math.log10(c["lr"]) - math.log10(self.best)) ** 2 + 0.01 * c["seed"]
            h = [dict(val_error=err, test_error=err + 1)]
            out.append(dict(config=c, history=h, diverged=False, steps=1, seconds=0.0))
        return out


@pytest.mark.parametrize(("best", "centre"), [(1e-4, 0.1), (30.0, 0.1), (0.1, 0.1)])
def test_tuning_extends_the_grid_until_the_choice_is_inside(best, centre):
    fake = _SyntheticRunner(best)
    protocol = Protocol(points=5, tune_seeds=2, final_seeds=3, max_extensions=8)
    runs = tune(fake, {"cell": ({"optimizer": "x"}, centre)}, protocol, "t")["cell"]
    row = summarize(runs, protocol.tune_seeds, protocol.final_seeds)
    assert row["lr"] == pytest.approx(best) and row["interior"]
    assert min(row["tried"]) < best < max(row["tried"])
    # the mean is over the reporting seeds, those that did not tune the rate (seed 2 of 0-2)
    assert row["seeds"] == 1 == len(row["report"]) and row["trials"] == 2 * len(row["tried"])
    b, c = lr_index(best), lr_index(centre)  # one rate past the best, never more
    grid = [lr for lr in row["tried"] if lr_at(lr_index(lr)) == lr]  # one log grid for everyone: 1-3-10 per decade
    assert len(grid) == max(c + 2, b + 1) - min(c - 2, b - 1) + 1
    # then the two midpoints around the grid's choice
    refined = sorted(set(row["tried"]) - set(grid))
    assert len(refined) == 2 and refined[0] < best < refined[1]
    assert refined == pytest.approx([best / 10**0.25, best * 10**0.25], rel=0.12)


class _CollapsingRunner(_SyntheticRunner):
    """Rates at or above ``cliff`` collapse to chance (about 90% validation error, no NaN): the noise
    of a collapse must not choose among them."""

    def __init__(self, best: float, cliff: float) -> None:
        super().__init__(best)
        self.cliff = cliff

    def run_all(self, configs, desc=""):
        out = super().run_all(configs, desc)
        for r in out:
            if r["config"]["lr"] >= self.cliff:  # collapses whose noise reads lowest at 0.56, mid-grid
                noise = (math.log10(r["config"]["lr"]) - math.log10(0.56)) ** 2
                r["history"] = [dict(val_error=90.0 + noise, test_error=90.0)]
        return out


def test_a_grid_whose_rates_all_collapse_grows_downwards():
    fake = _CollapsingRunner(best=0.1, cliff=0.3)
    protocol = Protocol(**FULL_PROTOCOL, final_seeds=3)
    runs = tune(fake, {"c": ({}, 0.56)}, protocol, "t")["c"]  # starts at 0.32, 0.56, 1: every rate collapses
    row = summarize(runs, protocol.tune_seeds, protocol.final_seeds, protocol.score)
    assert row["lr"] < 0.3 and row["interior"] and row["test_mean"] < 20
    assert min(row["tried"]) < row["lr"] < 0.3 <= max(row["tried"])
    only_collapses = [r for r in runs if r["config"]["lr"] >= 0.3]
    choice = choose(only_collapses, protocol.tune_seeds, protocol.score)
    assert choice.lr == min(r["config"]["lr"] for r in only_collapses) and not choice.interior


def test_tuning_stops_at_the_extension_cap_and_says_so():
    fake = _SyntheticRunner(1e-9)
    runs = tune(fake, {"c": ({}, 1.0)}, Protocol(points=3, tune_seeds=1, final_seeds=1, max_extensions=2), "t")["c"]
    row = summarize(runs, 1, 1)
    assert len(row["tried"]) == 5 and not row["interior"]  # and no refinement of an edge choice


def test_refinement_can_move_the_choice_off_the_grid():
    fake = _SyntheticRunner(0.55)  # between the grid's 0.3 and 1
    runs = tune(fake, {"c": ({}, 0.3)}, Protocol(points=5, tune_seeds=1, final_seeds=2), "t")["c"]
    row = summarize(runs, 1, 2)
    assert row["lr"] == 0.55 and row["seeds"] == 1 == len(row["report"])  # seed 1; seed 0 tuned
    assert len({c["lr"] for c in fake.seen}) == 7  # 5 grid rates and 2 midpoints
    again = tune(fake, {"c": ({}, 0.3)}, Protocol(points=5, tune_seeds=1, final_seeds=2), "t")["c"]
    assert {r["config"]["lr"] for r in again} == {r["config"]["lr"] for r in runs}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--epochs", "-3"], "--epochs must be a positive"),
        (["compare", "--epochs", "0"], "--epochs must be a positive"),
        (["compare", "--seeds", "0"], "--seeds must be at least 1"),
        (["compare", "--device", "cuda"], "no CUDA device"),
        (["compare", "--device", "nonsense"], "not a device torch knows"),
        (["compare", "--task", "cifar10"], "needs --data-dir"),
        (["compare", "--task", "imagenet"], "invalid choice: 'imagenet' (choose from 'mnist1d-4k'"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(argv, message, capsys, tmp_path, monkeypatch):
    if "cuda" in argv:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this machine and CI
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"neumann-repro {argv[0]}: error: ") and message in err[-1]  # the study's own usage
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "cache").exists()  # rejected before any work


def test_data_dir_without_cifar10_files_is_rejected(capsys, tmp_path):
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "data_batch_1").write_bytes(b"x")
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--task", "cifar10", "--data-dir", str(tmp_path / "cifar"), "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("neumann-repro compare: error: --data-dir") and "data_batch_2" in err and "test_batch" in err


def test_mnist1d_loader_is_offline_and_split(tmp_path):
    d = load_task("mnist1d-4k", tmp_path)
    assert d.x_train.shape == (3600, 1, 40) and d.x_val.shape == (400, 1, 40) and d.x_test.shape == (1000, 1, 40)
    assert (tmp_path / "mnist1d-4k.npz").exists()
    d2 = load_task("mnist1d-4k", tmp_path)  # from the cache, identical
    assert torch.equal(d.x_train, d2.x_train)
    for model in ("mlp", "cnn"):
        assert make_model(model, d)(d.x_train[:3]).shape == (3, 10)


def test_cifar10_loader_reads_the_pickle_format(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in [*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, size=(20, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, size=20)),
        }
        with open(root / name, "wb") as fh:
            pickle.dump(batch, fh)
    d = load_cifar10(tmp_path)
    assert d.x_train.shape == (90, 3, 32, 32) and d.x_val.shape == (10, 3, 32, 32) and d.x_test.shape[0] == 20
    assert abs(float(torch.cat([d.x_train, d.x_val]).mean())) < 1e-4
    assert make_model("cnn", d)(d.x_test[:2]).shape == (2, 10)
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar10(tmp_path / "missing")


def test_cifar10_needs_data_dir(tmp_path):
    with pytest.raises(ValueError, match="--data-dir"):
        load_task("cifar10", tmp_path)


def test_committed_report_is_what_the_committed_results_render_to(tmp_path, monkeypatch):
    """docs/REPRODUCTION.md is a pure function of docs/results/*.json (and the hand-written notes)."""
    root = Path(__file__).resolve().parents[2]  # the repository root
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copyfile(root / "docs" / "reproduction_notes.md", docs / "reproduction_notes.md")
    _no_training(monkeypatch)
    main(["report", "--results", str(root / "docs" / "results"), "--report", str(docs / "REPRODUCTION.md")])
    assert (docs / "REPRODUCTION.md").read_text() == (root / "docs" / "REPRODUCTION.md").read_text()
    for study in ("compare", "batch-scaling"):
        payload = json.loads((root / "docs" / "results" / f"{study}.json").read_text())
        assert all("train_size" in r and "steps" in r and r["history"] for r in payload["runs"])


def _tiny_data(n: int = 256):
    from neumann_repro.tasks import Dataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 40, generator=g)
    y = (x[:, 0, :20].mean(1) > x[:, 0, 20:].mean(1)).long() + 2 * (x[:, 0, 0] > 0).long()
    return Dataset("tiny", x[:200], y[:200], x[200:228], y[200:228], x[228:], y[228:], 10)


def test_gru_and_transformer_models_read_a_1d_signal():
    from neumann_repro.tasks import MODELS, PatchTransformer

    d = _tiny_data()
    for name in MODELS:
        assert make_model(name, d)(d.x_train[:5]).shape == (5, 10), name
    tr = make_model("transformer", d)
    norms = [m for m in tr.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 5 and not any(isinstance(m, torch.nn.Dropout) for m in tr.modules())  # pre-norm, no dropout
    with pytest.raises(ValueError, match="multiple of the patch"):
        PatchTransformer(1, 42, 10)
    with pytest.raises(ValueError, match="unknown model"):
        make_model("lstm", d)


def test_clipping_is_counted_and_changes_the_run():
    from neumann_repro.train import run

    d = _tiny_data()
    cfg = dict(task="tiny", model="gru", optimizer="neumann", lr=0.1, batch=20, epochs=2, seed=0, warmup_epochs=0)
    plain = run(cfg, d, torch.device("cpu"))
    always = run({**cfg, "clip": 1e-4}, d, torch.device("cpu"))
    never = run({**cfg, "clip": 1e6}, d, torch.device("cpu"))
    assert always["clipped_fraction"] == 1.0 and never["clipped_fraction"] == 0.0 and "clipped_fraction" not in plain
    assert [e["train_loss"] for e in never["history"]] == [e["train_loss"] for e in plain["history"]]
    assert always["history"][-1]["train_loss"] != plain["history"][-1]["train_loss"]


def test_batchnorm_evaluation_variants_are_recorded_for_neumann():
    from neumann_repro.train import run

    d = _tiny_data()
    cfg = dict(task="tiny", model="cnn", optimizer="neumann", lr=0.1, batch=20, epochs=3, seed=0, warmup_epochs=0)
    cfg.update(burn_in_epochs=1, bn_variants=True)
    h = run(cfg, d, torch.device("cpu"))["history"]
    assert all({"test_error_at_w", "test_error_no_bn_update", "test_error"} <= set(e) for e in h)
    assert all(0 <= e["test_error_at_w"] <= 100 for e in h)
    plain = run({**cfg, "bn_variants": False}, d, torch.device("cpu"))["history"]
    assert [e["test_error"] for e in plain] == [e["test_error"] for e in h]  # recording them changes nothing


def test_tables_report_the_reporting_seeds_only_and_say_so():
    """A tuning seed that diverged at the chosen rate, or ended far better, moves neither the mean, the
    divergence count nor the runs a curve is drawn from; a quick run without reporting seeds falls back to
    the tuning seeds, and the header's words follow."""
    from neumann_repro.tuning import reported

    def run(lr: float, seed: int, err: float, diverged: bool = False) -> dict:
        hist = [] if diverged else [{"epoch": 1, "val_error": err, "test_error": err}]
        return {"config": {"lr": lr, "seed": seed, "epochs": 1}, "history": hist, "diverged": diverged, "steps": 1}

    runs = [run(0.1, s, 30.0) for s in (0, 1)] + [run(1.0, s, 40.0) for s in (0, 1)]
    runs += [run(0.3, 0, 1.0), run(0.3, 1, 2.0)] + [run(0.3, s, 10.0 + s) for s in (2, 3, 4, 5)]
    row = summarize(runs, 2, 6, "worse")
    assert row["lr"] == 0.3 and row["report"] == [12.0, 13.0, 14.0, 15.0] and row["test_mean"] == 13.5
    assert [r["config"]["seed"] for r in reported(runs, 2, 6, 0.3)] == [2, 3, 4, 5] and row["diverged"] == 0
    assert [r["config"]["seed"] for r in reported(runs, 2, 2, 0.3)] == [0, 1]
    assert Protocol(**FULL_PROTOCOL, final_seeds=6).seeds_text().startswith("4 reporting seeds (2-5) at the chosen")
    assert "no reporting seeds" in Protocol(points=3, tune_seeds=1, final_seeds=1).seeds_text()
