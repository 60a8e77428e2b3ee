"""``import neumann_optimizer`` needs torch alone: the frameworks and the study extras stay out."""

from __future__ import annotations

import subprocess
import sys


def test_core_import_pulls_no_framework():
    code = (
        "import sys, neumann_optimizer\n"
        "from neumann_optimizer import Neumann, diagnostics, idealized\n"
        "bad = [m for m in ('lightning', 'transformers', 'accelerate', 'pytorch_optimizer', 'matplotlib',"
        " 'mnist1d') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
