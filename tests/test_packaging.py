"""Both distributions as a user installs them: each wheel built from this checkout, installed
into a fresh virtual environment, imported from there and stepped once.

Dependencies are not downloaded: the fresh environment sees the test environment's packages
through a ``.pth`` file, and the checks below make sure the imported code is the wheel's (not
the source tree) and, for ``neumann-optax``, that torch is never imported.
"""

from __future__ import annotations

import email
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib
import torch

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
# the fresh environment must not see the source tree through PYTHONPATH
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _build_and_install(
    source: Path, tmp: Path, venv_python: Path | None = None
) -> tuple[Path, Path, email.message.Message]:
    """Build ``source``'s wheel in ``tmp/wheels`` and install it into a fresh virtual environment
    (or into the one of ``venv_python``)."""
    tmp.mkdir(parents=True, exist_ok=True)
    wheels = tmp / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(source),
        ],
        check=True,
        capture_output=True,
        cwd=tmp,
        env=ENV,
    )
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        meta = email.message_from_bytes(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))))
    if venv_python is None:
        venv = tmp / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=ENV)
        python = venv / "bin" / "python"
    else:
        python = venv_python
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        env=ENV,
    )
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            env=ENV,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # the dependencies (torch, jax, optax) from this environment, after the wheel's own files; the
    # test environment's editable installs (the source tree) are left out
    (site / "zz_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, site, meta


def _requires(meta: email.message.Message) -> list[str]:
    return [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]


def _wheel_files(tmp: Path) -> list[str]:
    (wheel,) = (tmp / "wheels").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def test_neumann_optimizer_wheel_installs_and_steps(tmp_path):
    python, site, meta = _build_and_install(ROOT, tmp_path)
    assert meta["Name"] == "neumann-optimizer"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert _requires(meta) == declared and declared[0].startswith("torch>="), _requires(meta)  # torch only
    files = _wheel_files(tmp_path)
    # the optimizer alone: no study code, no reproduction extra, no command
    assert not [f for f in files if "repro" in f], [f for f in files if "repro" in f]
    assert not [f for f in files if f.endswith("entry_points.txt")]
    assert "repro" not in (meta.get_all("Provides-Extra") or [])
    code_files = sorted(f for f in files if f.startswith("neumann_optimizer/"))
    assert "neumann_optimizer/optimizer.py" in code_files and "neumann_optimizer/_native.c" in code_files
    code = (
        "import torch, neumann_optimizer as n\n"
        f"assert n.__file__.startswith({str(site)!r}), n.__file__\n"
        "from pathlib import Path\n"
        "assert (Path(n.__file__).parent / '_native.c').is_file()\n"
        "w = torch.nn.Parameter(torch.ones(3))\n"
        "opt = n.Neumann([w], lr=0.1, burn_in_steps=1, reset_steps=2, momentum_ramp_steps=1)\n"
        "for _ in range(4):\n"
        "    w.grad = 2 * w.detach()\n"
        "    opt.step()\n"
        "assert opt.param_groups[0]['step'] == 4\n"
        f"assert n.__version__ == {meta['Version']!r}, n.__version__\n"
        "assert sorted(n.__all__) == ['Neumann', 'ScheduleWarning', '__version__', 'eval_state_dict'], n.__all__\n"
        "print('OK', n.__version__)\n"
    )
    res = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600, env=ENV)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_neumann_optax_wheel_installs_without_torch(tmp_path):
    python, site, meta = _build_and_install(ROOT / "neumann-optax", tmp_path)
    assert meta["Name"] == "neumann-optax"
    names = sorted(r.split(">")[0].split("=")[0].split("<")[0].strip() for r in _requires(meta))
    assert names == ["jax", "optax"], names
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.') or name.startswith('neumann_optimizer'):\n"
        "            raise ImportError(name + ' must not be imported')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import jax.numpy as jnp, optax, neumann_optax\n"
        f"assert neumann_optax.__file__.startswith({str(site)!r}), neumann_optax.__file__\n"
        "tx = neumann_optax.neumann(0.1, steps_per_epoch=1)\n"
        "p = {'w': jnp.ones(3)}\n"
        "s = tx.init(p)\n"
        "for _ in range(7):\n"
        "    u, s = tx.update({'w': 2 * p['w']}, s, p)\n"
        "    p = optax.apply_updates(p, u)\n"
        "assert int(s.count) == 7 and 'torch' not in sys.modules\n"
        f"assert neumann_optax.__version__ == {meta['Version']!r}, neumann_optax.__version__\n"
        "print('OK')\n"
    )
    res = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600, env=ENV)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_neumann_repro_wheel_installs_the_command(tmp_path):
    """The reproduction is a distribution of its own: its wheel, beside the library's, installs the
    ``neumann-repro`` command, which runs from the fresh environment."""
    lib_python, _, _ = _build_and_install(ROOT, tmp_path / "lib")
    python, site, meta = _build_and_install(ROOT / "neumann-repro", tmp_path / "repro", venv_python=lib_python)
    assert meta["Name"] == "neumann-repro"
    names = sorted(r.split(">")[0].split("=")[0].split("<")[0].strip() for r in _requires(meta))
    assert names == ["matplotlib", "mnist1d", "neumann-optimizer", "numpy", "pytorch-optimizer", "scipy", "tqdm"], names
    assert not [f for f in _wheel_files(tmp_path / "repro") if f.startswith("neumann_optimizer/")]
    command = python.parent / "neumann-repro"
    res = subprocess.run([str(command), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=300, env=ENV)
    assert res.returncode == 0 and "critical-batch" in res.stdout, res.stderr[-3000:]
    where = subprocess.run(
        [str(python), "-c", "import neumann_repro, neumann_optimizer as n; print(neumann_repro.__file__, n.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=ENV,
    ).stdout.split()
    assert where and all(w.startswith(str(site)) for w in where), where  # both from the wheels, not the tree


def test_device_check_says_in_one_line_that_there_is_no_gpu():
    """benchmarks/device_check.py, the command for the day a GPU is lent, on a machine without one."""
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_check.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**ENV, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert res.returncode == 0 and res.stdout.strip().splitlines() == [
        "device_check: no CUDA device here; nothing checked or measured (run it on a GPU machine)"
    ], (res.stdout, res.stderr[-2000:])


def test_device_check_fails_a_path_that_skips_float16_steps(monkeypatch):
    """The GPU script's check can fail: with the finite check that once reduced float16 gradients
    in float16 (their L1 norm overflows, so every step was skipped) its float16 row is not ok;
    with the library's own check, every row of the non-compiled paths passes (here on CPU)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import device_check

    from neumann_optimizer import _nonfinite

    for path in ("Neumann() default", "Neumann(capturable=True)"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            row = device_check.check_path(path, dtype, "cpu")
            assert row["ok"] and row["max_abs_err"] < row["tol"], row
    overflowing = lambda grads: torch.isfinite(torch.stack(torch._foreach_norm(grads, 1))).all()  # noqa: E731
    monkeypatch.setattr(_nonfinite, "finite_tensor", overflowing)
    row = device_check.check_path("Neumann() default", torch.float16, "cpu")
    assert not row["ok"] and row["step"] == 0 and row["skipped"] == 10, row
