"""Run the library's own tests against older PyTorch releases, each in a virtual environment of its own.

    python tests/torch_compat.py                       # 2.4.1 2.6.0 2.8.0 2.10.0
    python tests/torch_compat.py --versions 2.5.1 2.7.1 --venvs /tmp/compat

Not part of the test suite (CI runs the pinned CPU build only): a check to rerun on demand, when
the supported floor (``torch>=`` in pyproject.toml) is to move. Each environment gets ``torch==V``
from the package index (on Linux x86_64 that is PyPI's CUDA build, 5-7 GB with its ``nvidia-*``
packages; it runs on the CPU) plus the test tools, and runs the library's tests against ``src/``
(nothing is installed into it from this checkout). The reproduction's, the frameworks' and the JAX
port's tests are left out: they pin their own, newer requirements. Prints one row per version and
writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VERSIONS = ["2.4.1", "2.6.0", "2.8.0", "2.10.0"]
LIBRARY_TESTS = [
    "test_reference.py",
    "test_optimizer_api.py",
    "test_contract.py",
    "test_optim_info.py",
    "test_fused.py",
    "test_compile_and_idealized.py",
    "test_schedulers.py",
    "test_diagnostics.py",
    "test_noise_scale.py",
    "test_native_cache.py",
    "test_monitoring.py",
    "test_core_imports.py",
    "test_distributed.py",
]
TEST_TOOLS = ["numpy", "pytest", "pytest-timeout", "hypothesis", "expecttest", "tensorboard"]
TEST_TIMEOUT_S = 300  # per test: a hang (a collective that never returns) fails that test only


def _env_python(venvs: Path, version: str) -> Path:
    """The environment for ``torch==version``, created (and filled) on first use."""
    d = venvs / f"torch-{version}"
    python = d / "bin" / "python"
    if not python.exists():
        venv.create(d, with_pip=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pin:
        pin.write(f"torch=={version}\n")  # nothing may move torch off the version under test
    cmd = [str(python), "-m", "pip", "install", "-q", "--no-cache-dir", "-c", pin.name]
    subprocess.run([*cmd, f"torch=={version}", *TEST_TOOLS], check=True)  # quick once it is all there
    return python


def _counts(output: str) -> dict[str, int]:
    """pytest's closing line as counts (passed, failed, skipped, errors)."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", lines[-1] if lines else ""):
        counts["errors" if word.startswith("error") else word] = int(n)
    return counts


def check(version: str, venvs: Path, log_dir: Path) -> dict:
    start = time.time()
    python = _env_python(venvs, version)
    torch_version = subprocess.run(
        [str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True, check=True
    ).stdout.strip()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    tests = [str(ROOT / "tests" / t) for t in LIBRARY_TESTS]
    proc = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", f"--timeout={TEST_TIMEOUT_S}", *tests],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    log = log_dir / f"torch-{version}.log"
    log.write_text(proc.stdout + proc.stderr)
    failures = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return dict(
        version=version,
        torch=torch_version,
        exit_code=proc.returncode,
        **_counts(proc.stdout),
        seconds=round(time.time() - start),
        failures=failures,
        log=str(log),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", nargs="+", default=DEFAULT_VERSIONS, help="torch releases to test")
    parser.add_argument(
        "--venvs",
        type=Path,
        default=Path.home() / ".cache" / "neumann-optimizer-torch-compat",
        help="where the environments are kept (one per version, reused; default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "torch_compat.json", help="JSON written here")
    args = parser.parse_args(argv)
    args.venvs.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'torch':>10} {'passed':>7} {'failed':>7} {'errors':>7} {'skipped':>8} {'seconds':>8}")
    for version in args.versions:
        row = check(version, args.venvs, args.out.parent)
        rows.append(row)
        print(
            f"{row['torch']:>10} {row['passed']:>7} {row['failed']:>7} {row['errors']:>7} {row['skipped']:>8} "
            f"{row['seconds']:>8}"
        )
        for line in row["failures"]:
            print(f"           {line}")
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"written: {args.out} (logs beside it)")
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
