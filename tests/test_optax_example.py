"""examples/optax_mnist1d.py trains: a Flax MLP on MNIST-1D with neumann_optax, evaluated at the
evaluation weights."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "optax_mnist1d.py"


@pytest.mark.slow
def test_flax_example_learns_mnist1d(capsys):
    spec = importlib.util.spec_from_file_location("optax_mnist1d", EXAMPLE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # Flax's dataclasses look their module up
    spec.loader.exec_module(mod)
    acc = mod.main(["--epochs", "12", "--samples", "3000"])
    assert acc > 0.45, acc  # chance is 0.10; 40 epochs on 5,000 samples reach about 0.68
    assert "test accuracy at the evaluation weights" in capsys.readouterr().out
