"""The CPU kernel of the fused path: ``_native.c`` compiled at first use and loaded with ctypes.

Why a kernel of our own: a Neumann step moves Adam's 28 bytes per parameter only if the norm
``||w - v||`` that the next step's regularizer needs is summed in the same pass that writes ``w``
and ``v``. Inductor's CPU code for such a graph stages ``v`` in a temporary and copies it back
(2-3x slower, docs/PERFORMANCE.md); a 150-line C loop does it at the bandwidth limit.

The library is compiled with the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``)
and OpenMP, for the host CPU (``-march=native``), once per source, compiler and CPU, into
``$NEUMANN_OPTIMIZER_CACHE`` (default ``~/.cache/neumann_optimizer``); it takes about a second.
Where that fails (no compiler, no OpenMP), :func:`library` returns ``None`` and the optimizer
uses its torch.compile'd path. ``NEUMANN_OPTIMIZER_NATIVE=0`` turns the kernel off.

The OpenMP runtime is ``libgomp.so.1``, the one torch's CPU build already loaded, so the kernel
and torch share one thread pool; it uses ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["DTYPES", "all_finite", "available", "library", "squared_distance", "step", "supports", "unavailable_reason"]

DTYPES = {torch.float32: "f32", torch.float64: "f64"}
PHASE_CODES = {"burn_in": 0, "reset": 1, "neumann": 2}
_SOURCE = Path(__file__).with_name("_native.c")
_COMMON = ["-O3", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
# tried in order; 512-bit vectors measured 4-7% faster than 256-bit where the CPU has them
_FLAG_SETS = (
    [*_COMMON, "-march=native", "-mprefer-vector-width=512"],
    [*_COMMON, "-march=native"],
    _COMMON,
)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_reason = ""


def _cache_dir() -> Path:
    root = os.environ.get("NEUMANN_OPTIMIZER_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "neumann_optimizer"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's feature flags where Linux lists them."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _writable_cache_dir() -> Path:
    """The cache directory, or one under the temporary directory where it cannot be created."""
    for d in (_cache_dir(), Path(tempfile.gettempdir()) / f"neumann_optimizer-{os.getuid()}"):
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise RuntimeError(f"no writable cache directory ({_cache_dir()})")


def _build(cc: str, source: bytes) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    cache = _writable_cache_dir()
    errors = []
    for flags in _FLAG_SETS:
        parts = [source, " ".join(flags).encode(), version.encode(), _cpu_signature().encode()]
        key = hashlib.sha256(b"\0".join(parts))
        target = cache / f"neumann_kernel_{key.hexdigest()[:20]}.so"
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            proc = subprocess.run(
                [cc, *flags, str(_SOURCE), "-o", str(out), "-lm"], capture_output=True, text=True, check=False
            )
            if proc.returncode == 0:
                os.replace(out, target)  # atomic: concurrent processes (torchrun ranks) may race here
                return target
            errors.append(f"{cc} {' '.join(flags)}: {proc.stderr.strip()[-400:]}")
    raise RuntimeError("; ".join(errors))


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, compiling it on the first call; ``None`` where unavailable."""
    global _lib, _tried, _reason
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            if os.environ.get("NEUMANN_OPTIMIZER_NATIVE", "1") == "0":
                raise RuntimeError("turned off by NEUMANN_OPTIMIZER_NATIVE=0")
            if sys.platform == "win32":
                raise RuntimeError("not built on Windows")
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler found (set CC)")
            lib = ctypes.CDLL(str(_build(cc, _SOURCE.read_bytes())))
            ptrs, i64p = ctypes.c_void_p, ctypes.c_void_p  # arrays of data pointers / of sizes
            for suffix in DTYPES.values():
                fn = getattr(lib, f"neumann_step_{suffix}")
                fn.restype = ctypes.c_double
                fn.argtypes = [ctypes.c_int64, ptrs, ptrs, ptrs, ptrs, i64p, ctypes.c_int]
                fn.argtypes += [ctypes.c_double] * 5 + [ctypes.c_int]
                fn = getattr(lib, f"neumann_sqdist_{suffix}")
                fn.restype = ctypes.c_double
                fn.argtypes = [ctypes.c_int64, ptrs, ptrs, i64p, ctypes.c_int]
                fn = getattr(lib, f"neumann_all_finite_{suffix}")
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_int64, ptrs, i64p, ctypes.c_int]
            _lib = lib
        except Exception as exc:  # any failure: the caller uses the torch.compile'd path
            _reason = f"{type(exc).__name__}: {exc}"
            _lib = None
        _tried = True
        return _lib


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str:
    """Why :func:`library` returned ``None`` (empty if it did not)."""
    library()
    return _reason


def supports(*lists: list[Tensor]) -> bool:
    """Non-empty lists of dense contiguous CPU tensors, all float32 or all float64 (the kernel's
    types)."""
    if not lists or not lists[0]:
        return False
    dtype = lists[0][0].dtype
    return dtype in DTYPES and all(
        t.is_cpu and t.dtype is dtype and t.layout is torch.strided and t.is_contiguous() for ts in lists for t in ts
    )


def pointers(tensors: list[Tensor]) -> ctypes.Array:
    """The tensors' data pointers as a C array (``T **`` on the C side)."""
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def sizes(tensors: list[Tensor]) -> ctypes.Array:
    return (ctypes.c_int64 * len(tensors))(*[t.numel() for t in tensors])


def step(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor],
    *,
    phase: str,
    lr: float,
    momentum: float,
    coef: float,
    keep: float,
    weight_decay: float,
) -> float:
    """One step of the group in place (``keep = 1 - gamma``); returns ``sum ||w - v||^2`` after it.

    Bumps the version counters of the tensors it writes, as an in-place torch op would.
    """
    lib = library()
    assert lib is not None
    sq = getattr(lib, f"neumann_step_{DTYPES[params[0].dtype]}")(
        len(params),
        pointers(params),
        pointers(grads),
        pointers(ms),
        pointers(vs),
        sizes(params),
        PHASE_CODES[phase],
        lr,
        momentum,
        coef,
        keep,
        weight_decay,
        torch.get_num_threads(),
    )
    torch.autograd.graph.increment_version(params if phase == "burn_in" else [*params, *ms, *vs])
    return float(sq)


def squared_distance(params: list[Tensor], vs: list[Tensor]) -> float:
    """``sum ||w - v||^2`` over the group, accumulated in double."""
    lib = library()
    assert lib is not None
    fn = getattr(lib, f"neumann_sqdist_{DTYPES[params[0].dtype]}")
    return float(fn(len(params), pointers(params), pointers(vs), sizes(params), torch.get_num_threads()))


def all_finite(grads: list[Tensor]) -> bool:
    """No inf or NaN in any of ``grads`` (one read of each, stops early at the first)."""
    lib = library()
    assert lib is not None
    fn = getattr(lib, f"neumann_all_finite_{DTYPES[grads[0].dtype]}")
    return bool(fn(len(grads), pointers(grads), sizes(grads), torch.get_num_threads()))
