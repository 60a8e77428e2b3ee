"""Stress for the tests that spawn gloo ranks: the DDP tests of test_noise_scale and
test_distributed, 10 times each, beside a CPU-bound process (a 2-core machine then has more work
than cores, the load under which a rank once aborted at exit). About 7 minutes on 2 cores, so it
is marked ``stress`` and left out of the default run: ``python -m pytest -m stress tests/test_spawn_stress.py``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 10
BURN = "import time\nend = time.monotonic() + 3600\nwhile time.monotonic() < end:\n    sum(range(10000))\n"


@pytest.mark.stress
@pytest.mark.slow
def test_ddp_tests_pass_ten_times_under_load(capsys):
    selection = [
        "tests/test_noise_scale.py::test_ddp_hook_matches_the_single_process_estimator",
        "tests/test_distributed.py::test_matches_single_process_full_batch[ddp]",
    ]
    burner = subprocess.Popen([sys.executable, "-c", BURN])
    failures = []
    try:
        for i in range(REPEATS):
            res = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=900,
            )
            last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
            with capsys.disabled():
                print(f"\n[stress {i + 1}/{REPEATS}] {last}")
            if res.returncode != 0:
                failures.append(res.stdout[-6000:])
    finally:
        burner.kill()
        burner.wait()
    assert not failures, "\n\n".join(failures)
