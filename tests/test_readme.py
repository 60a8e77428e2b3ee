"""The README's quick start is the example file, and it trains."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quickstart_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quickstart_is_the_example_file():
    example = (ROOT / "examples" / "quickstart.py").read_text()
    assert _quickstart_block().strip() in example


def test_readme_quickstart_trains():
    pytest.importorskip("mnist1d")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_quickstart_block(), "README-quickstart", "exec"), {"__name__": "__readme__"})
    acc = float(re.search(r"test accuracy: ([0-9.]+)", out.getvalue()).group(1))
    assert acc > 0.45  # chance is 0.10


def test_ci_runs_the_readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up \(two commands\).*?```bash\n(.*?)```", text, re.S).group(1)
    commands = [c for c in block.strip().splitlines() if c.strip()]
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text()
    for c in commands:
        assert c in ci
