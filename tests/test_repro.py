"""The reproduction CLI on tiny settings: outputs, caching/resume, task loaders."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("mnist1d")
pytest.importorskip("matplotlib")

from neumann_optimizer.repro import runner as runner_mod
from neumann_optimizer.repro.__main__ import main
from neumann_optimizer.repro.tasks import load_cifar10, load_task, make_model


def test_compare_quick_writes_table_results_and_plot(tmp_path, capsys):
    assert main(["compare", "--quick", "--epochs", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    study = tmp_path / "compare"
    table = (study / "table.md").read_text()
    for name in ("Neumann", "SGD+Nesterov", "Adam", "RMSprop"):
        assert name in table
    res = json.loads((study / "results.json").read_text())
    assert len(res["runs"]) == 2 * 4 * 3  # models x optimizers x lr grid
    assert all(len(r["history"]) == 2 for r in res["runs"] if not r["diverged"])
    assert (study / "test_error.png").stat().st_size > 1000
    assert "compare" in capsys.readouterr().out


def test_finished_runs_are_cached_and_resumed(tmp_path, monkeypatch):
    args = ["compare", "--quick", "--epochs", "1", "--out", str(tmp_path), "--no-progress"]
    main(args)
    cached = sorted((tmp_path / "cache").glob("*.json"))
    assert len(cached) == 24
    # an interrupted study: drop two results, then rerun: only those two are trained again
    cached[0].unlink()
    cached[1].unlink()
    calls = []
    real_run = runner_mod.run
    monkeypatch.setattr(runner_mod, "run", lambda *a, **k: calls.append(1) or real_run(*a, **k))
    main(args)
    assert len(calls) == 2


def test_report_is_generated(tmp_path):
    main(["compare", "--quick", "--epochs", "1", "--out", str(tmp_path), "--no-progress"])
    report = tmp_path / "docs" / "REPRODUCTION.md"
    main(["report", "--quick", "--out", str(tmp_path), "--report", str(report), "--no-progress"])
    text = report.read_text()
    assert "## compare (Table 2)" in text and "Verdict" in text and "Not run yet" in text
    assert (tmp_path / "docs" / "img" / "compare-test_error.png").exists()


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
