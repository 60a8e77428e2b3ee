"""``neumann-repro`` as a newcomer meets it: one-line errors for bad output places, Ctrl-C,
``report`` without results, per-study help, a data cache shared by concurrent processes, and quick
studies that reach the Neumann phase."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mnist1d")

import contextlib

from neumann_repro import runner as runner_mod
from neumann_repro import tuning as tuning_mod
from neumann_repro.cli import COMMAND_HELP, main
from neumann_repro.registry import studies as _studies
from neumann_repro.study import Settings
from neumann_repro.tasks import load_task

ROOT = Path(__file__).resolve().parents[2]  # the repository root (docs/results)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize("where", ["file", "under_file", "proc"])
def test_unwritable_out_is_one_line_and_exit_2(where, tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    out = {"file": f, "under_file": f / "sub", "proc": Path("/proc/neumann-repro-test")}[where]
    with pytest.raises(SystemExit) as e:
        main(["compare", "--quick", "--out", str(out), "--no-progress"])
    assert e.value.code == 2
    assert _one_line_error(capsys).startswith("neumann-repro compare: error: --out")


@pytest.mark.parametrize("where", ["dir", "proc"])
def test_unwritable_report_is_one_line_and_exit_2(where, tmp_path, capsys):
    report = {"dir": tmp_path, "proc": Path("/proc/neumann-repro-test/report.md")}[where]
    with pytest.raises(SystemExit) as e:
        main(["report", "--results", str(ROOT / "docs" / "results"), "--report", str(report)])
    assert e.value.code == 2
    assert _one_line_error(capsys).startswith("neumann-repro report: error: --report")


def test_report_without_results_says_so_and_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["report"])
    assert e.value.code == 2
    assert "no study results" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []  # no runs/, no docs/


def test_report_elsewhere_keeps_the_discussion(tmp_path):
    report = tmp_path / "elsewhere" / "REPORT.md"
    assert main(["report", "--results", str(ROOT / "docs" / "results"), "--report", str(report)]) == 0
    notes = (ROOT / "docs" / "reproduction_notes.md").read_text().strip().splitlines()[0]
    assert notes in report.read_text()


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "neumann_repro",
        "compare",
        "--quick",
        "--epochs",
        "30",  # a study far longer than the wait for its first cached run: the interrupt lands mid-study
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.Popen(
        [*cmd, "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        # as from a terminal: a test runner started in the background (nohup, `&`) ignores SIGINT, and
        # an ignored SIGINT is inherited through exec, so the study would never see the Ctrl-C
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not list((tmp_path / "cache").glob("*.json")) and time.time() < deadline:
        time.sleep(0.2)  # interrupt once training is under way (a run is cached)
    assert proc.poll() is None, "the study ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 130, err.decode()[-2000:]
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err.decode()
    assert str(tmp_path / "cache") in lines[0] and "OUT/" not in lines[0]  # the real path
    assert all(p.stat().st_size > 0 for p in (tmp_path / "cache").glob("*.json"))  # the cache is intact


def test_every_study_has_its_own_help(capsys):
    for name in [*_studies(), "all", "report"]:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = " ".join(capsys.readouterr().out.split())
        entry = _studies().get(name)
        text = entry.help if entry is not None else COMMAND_HELP[name]
        assert " ".join(text.split())[:60] in out


def test_help_is_plain_text_with_only_the_options_a_study_reads(capsys):
    texts = {}
    for name in [None, *_studies(), "all", "report"]:
        with pytest.raises(SystemExit):
            main([name, "--help"] if name else ["--help"])
        texts[name] = capsys.readouterr().out
    for name, text in texts.items():
        assert "``" not in text and ":func:" not in text and "issue" not in text.lower(), name
    flags = {"epochs": "--epochs", "schedule": "--schedule", "seeds": "--seeds", "jobs": "--jobs", "task": "--task"}
    for name, entry in _studies().items():
        assert "--report" not in texts[name], name
        for option, flag in flags.items():  # exactly the options the study reads
            assert (flag in texts[name]) == (option not in entry.unused_options), (name, flag)
        assert "min on one core" in " ".join(texts[name].split()), name  # how long a full run takes
    assert "--report" in texts["all"] and "--report" in texts["report"]
    assert "--task" not in texts["report"] and "--jobs" not in texts["report"]


def test_a_studys_error_shows_its_own_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["batch-scaling", "--jobs", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: neumann-repro batch-scaling" in err and "--jobs must be at least 1" in err


def test_jobs_default_to_the_cores():
    from neumann_repro.cli import _parser

    _, subs = _parser(_studies())
    assert subs["compare"].parse_args([]).jobs == (os.cpu_count() or 1)


def _seeds_quick(out: Path, results: Path, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "neumann_repro", "seeds", "--quick", "--jobs", "1"]
    cmd += ["--out", str(out), "--results", str(results), "--no-progress"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_a_damaged_cache_entry_is_named_and_trained_again(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    proc = _seeds_quick(out, results)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    files = sorted((out / "cache").glob("*.json"))
    assert len(files) >= 2
    damaged = files[0]
    damaged.write_bytes(damaged.read_bytes()[:100])  # what a crash or a full disk leaves
    (out / "seeds" / "table.md").unlink()
    proc = _seeds_quick(out, results)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    lines = [ln for ln in err.decode().splitlines() if ln.strip()]
    assert len(lines) == 1 and str(damaged) in lines[0] and "training it again" in lines[0]
    assert "Traceback" not in err.decode()
    assert json.loads(damaged.read_text())["history"]  # replaced by a finished run
    assert (out / "seeds" / "table.md").is_file()


def test_kill_9_in_the_middle_then_rerun_completes(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    proc = _seeds_quick(out, results, start_new_session=True)
    deadline = time.time() + 120
    while not list((out / "cache").glob("*.json")) and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # no handler runs: whatever was half done stays
    proc.communicate(timeout=60)
    proc = _seeds_quick(out, results)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "Traceback" not in err.decode()
    assert (out / "seeds" / "table.md").is_file()
    assert all(json.loads(p.read_text())["history"] for p in (out / "cache").glob("*.json"))


def _load(d: str) -> int:
    return len(load_task("mnist1d-4k", Path(d)).x_train)


def test_concurrent_processes_share_the_data_cache(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        sizes = pool.map(_load, [str(tmp_path)] * 2)
    assert sizes == [3600] * 2
    assert [p.name for p in tmp_path.iterdir()] == ["mnist1d-4k.npz"]  # no temporary files left


@pytest.mark.parametrize(
    "study", ["calibration", "compare", "batch-scaling", "ablation", "seeds", "regularizers", "cubic-weight"]
)
def test_quick_studies_reach_the_neumann_phase(study, tmp_path, monkeypatch):
    """Every Neumann run of a quick study spends at least 50 steps (and most of its epochs) past
    the burn-in. Checked on the configs the study asks for, with training replaced by a stub."""
    seen: list[dict] = []

    def fake_run_all(self, configs, desc="runs"):
        seen.extend(configs)
        return [
            dict(
                config=c,
                history=[dict(val_error=50.0 + c["lr"], test_error=50.0)],
                diverged=False,
                seconds=0.0,
                train_size=3600,
                steps_per_epoch=3600 // c["batch"],
                steps=c["epochs"] * (3600 // c["batch"]),
            )
            for c in configs
        ]

    monkeypatch.setattr(runner_mod.Runner, "run_all", fake_run_all)
    monkeypatch.setattr(tuning_mod.Runner, "run_all", fake_run_all)
    runner = runner_mod.Runner(tmp_path, progress=False)
    # the stub's results do not always render; the configs are what is checked
    with contextlib.suppress(KeyError, ValueError, TypeError, IndexError, ZeroDivisionError):
        _studies()[study].run(runner, Settings(quick=True))
    neumann = [c for c in seen if c["optimizer"].startswith("neumann")]
    assert neumann
    for c in neumann:
        spe = 3600 // c["batch"]
        burn_in = c.get("burn_in_epochs", 5)
        assert (c["epochs"] - burn_in) * spe >= 50, c
        assert c["epochs"] - burn_in >= math.ceil(0.5 * c["epochs"]), c


def test_quick_curvature_traces_the_neumann_phase(monkeypatch, tmp_path):
    from neumann_repro.studies import curvature as curv

    seen = {}

    def fake_trace(runner, cfg):
        seen.update(cfg)
        return [], 0.0

    monkeypatch.setattr(curv, "_trace", fake_trace)
    with contextlib.suppress(KeyError, ValueError, IndexError):
        curv.curvature(runner_mod.Runner(tmp_path, progress=False), Settings(quick=True))
    assert seen["epochs"] - seen.get("burn_in_epochs", 5) >= 5
