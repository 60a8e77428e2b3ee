"""``import neumann_optimizer`` needs torch alone: the frameworks and the study extras stay out."""

from __future__ import annotations

import subprocess
import sys

import pytest


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


def test_versions_are_the_installed_metadata_of_pyproject():
    from pathlib import Path

    import tomllib

    neumann_optax = pytest.importorskip("neumann_optax")  # (not installed by tests/torch_compat.py)

    import neumann_optimizer

    root = Path(__file__).resolve().parent.parent
    for module, toml in (
        (neumann_optimizer, root / "pyproject.toml"),
        (neumann_optax, root / "neumann-optax" / "pyproject.toml"),
    ):
        declared = tomllib.loads(toml.read_text())["project"]["version"]
        assert module.__version__ == declared, (module.__name__, module.__version__, declared)
    assert neumann_optimizer.__version__ == "0.2.0"  # the default changed: a minor release, not a patch
