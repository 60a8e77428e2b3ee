"""How the CPU kernel is built where the machine is not the usual one: a compiler that fails (the
failure is remembered, not retried at every start), no compiler, no OpenMP (a serial kernel), no home
directory, several processes building at once (one compiles), and channels_last tensors (they take
the kernel). Builds run in fresh processes with a fresh cache, through a wrapper around the C compiler
that logs each compile."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neumann_optimizer import Neumann, _native

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or shutil.which("cc") is None, reason="needs a C compiler (cc) to wrap"
)

PROBE = """
import json, sys, torch
from neumann_optimizer import _native, Neumann
ok = _native.available()
p = torch.nn.Parameter(torch.ones(1000, dtype=torch.float64))
opt = Neumann([p], lr=0.1, burn_in_steps=1, reset_steps=2, momentum_ramp_steps=1.0, cubic_weight=0.01)
for _ in range(4):
    p.grad = torch.full_like(p, 0.5)
    opt.step()
print(json.dumps(dict(ok=ok, reason=_native.unavailable_reason(), path=str(_native.library_path()),
                      native=any(opt._carried.values()), w=float(p[0]))))
"""


def _wrapper(tmp_path: Path, body: str) -> Path:
    """A compiler wrapper: logs every compile (not ``--version``) to ``cc.log``, then runs ``body``."""
    cc = tmp_path / "cc-wrapper"
    log = tmp_path / "cc.log"
    cc.write_text(f'#!/bin/sh\nif [ "$1" != "--version" ]; then echo "$*" >> {log}; fi\n{body}\n')
    cc.chmod(0o755)
    return cc


def _probe(tmp_path: Path, cc: Path | None, **env: str) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k not in ("CC", "NEUMANN_OPTIMIZER_NATIVE")}
    full.update(NEUMANN_OPTIMIZER_CACHE=str(tmp_path / "cache"), **env)
    if cc is not None:
        full["CC"] = str(cc)
    return subprocess.Popen([sys.executable, "-c", PROBE], env=full, stdout=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


def _compiles(tmp_path: Path) -> list[str]:
    log = tmp_path / "cc.log"
    return log.read_text().splitlines() if log.exists() else []


def _reference_w() -> float:
    p = torch.nn.Parameter(torch.ones(1000, dtype=torch.float64))
    opt = Neumann([p], lr=0.1, burn_in_steps=1, reset_steps=2, momentum_ramp_steps=1.0, cubic_weight=0.01, fused=False)
    for _ in range(4):
        p.grad = torch.full_like(p, 0.5)
        opt.step()
    return float(p.detach()[0])


def test_a_failed_build_is_remembered_and_not_retried(tmp_path):
    cc = _wrapper(tmp_path, 'if [ "$1" = "--version" ]; then echo broken-cc 1.0; exit 0; fi\nexit 1')
    first = _result(_probe(tmp_path, cc))
    tried = len(_compiles(tmp_path))
    assert not first["ok"] and not first["native"] and tried == len(_native._FLAG_SETS)
    assert first["w"] == pytest.approx(_reference_w(), rel=1e-12)  # the multi-tensor step instead
    second = _result(_probe(tmp_path, cc))  # a new process, the same compiler and cache
    assert not second["ok"] and "not retried" in second["reason"]
    assert len(_compiles(tmp_path)) == tried  # no compile this time


def test_no_compiler_steps_without_the_kernel(tmp_path):
    res = _result(_probe(tmp_path, None, PATH=str(tmp_path / "empty")))
    assert not res["ok"] and "no C compiler" in res["reason"] and not res["native"]
    assert res["w"] == pytest.approx(_reference_w(), rel=1e-12)


def test_without_openmp_a_serial_kernel_is_built(tmp_path):
    real = shutil.which("cc")
    cc = _wrapper(tmp_path, f'case "$*" in *-fopenmp*) exit 1;; esac\nexec {real} "$@"')
    res = _result(_probe(tmp_path, cc))
    assert res["ok"] and res["native"], res["reason"]
    compiles = _compiles(tmp_path)
    assert "-fopenmp" not in compiles[-1] and all("-fopenmp" in c for c in compiles[:-1])
    assert res["w"] == pytest.approx(_reference_w(), rel=1e-12)


def test_processes_building_at_once_compile_once(tmp_path):
    real = shutil.which("cc")
    cc = _wrapper(tmp_path, f'sleep 1\nexec {real} "$@"')  # a slow compiler: the two starts overlap
    procs = [_probe(tmp_path, cc) for _ in range(2)]
    results = [_result(p) for p in procs]
    assert all(r["ok"] and r["native"] for r in results)
    assert results[0]["path"] == results[1]["path"] and Path(results[0]["path"]).parent == tmp_path / "cache"
    assert len(_compiles(tmp_path)) == 1


def test_no_home_directory_falls_back_to_the_temporary_directory(tmp_path, monkeypatch):
    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    for var in ("NEUMANN_OPTIMIZER_CACHE", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    monkeypatch.setattr(_native.tempfile, "tempdir", str(tmp_path))
    for name, value in (("_tried", False), ("_lib", None), ("_path", None)):
        monkeypatch.setattr(_native, name, value)
    path = _native.library_path()
    assert path is not None, _native.unavailable_reason()
    assert path.parent == tmp_path / f"neumann_optimizer-{os.getuid()}"


@pytest.mark.skipif(not _native.available(), reason=f"no CPU kernel: {_native.unavailable_reason()}")
def test_channels_last_weights_take_the_kernel_and_match_the_for_loop():
    torch.manual_seed(0)
    w0 = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    grads = [torch.randn(8, 3, 5, 5, dtype=torch.float64) for _ in range(6)]
    out = {}
    for fused in (None, False):
        p = torch.nn.Parameter(w0.clone().to(memory_format=torch.channels_last))
        opt = Neumann(
            [p], lr=0.1, burn_in_steps=1, reset_steps=2, momentum_ramp_steps=1.0, cubic_weight=0.01, fused=fused
        )
        for g in grads:
            p.grad = g.to(memory_format=torch.channels_last)
            opt.step()
        assert not p.is_contiguous() and opt.state[p]["m"].stride() == p.stride()
        out[fused] = (p.detach().clone(), any(opt._carried.values()))
    assert out[None][1] and not out[False][1]  # the kernel ran; the for-loop did not
    torch.testing.assert_close(out[None][0], out[False][0], rtol=1e-13, atol=1e-13)
    # a gradient whose strides differ from the weight's: that step leaves the kernel, still correct
    assert not _native.supports([p.detach()], [grads[0]])
