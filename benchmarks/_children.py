"""Measure each variant of a memory benchmark in a fresh process (a process's peak memory only
grows, so variants measured in one process would hide each other)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def in_children(script: str, variants: tuple[str, ...], millions: float) -> list[dict[str, Any]]:
    """Run ``script --child VARIANT --millions M`` once per variant; each prints one JSON row."""
    rows = []
    for variant in variants:
        cmd = [sys.executable, script, "--child", variant, "--millions", str(millions)]
        rows.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout))
    return rows
