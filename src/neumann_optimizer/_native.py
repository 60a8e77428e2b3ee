"""The CPU kernel of the fused path: ``_native.c`` compiled at first use and loaded with ctypes.

Why a kernel of our own: a Neumann step moves Adam's 28 bytes per parameter only if the norm
``||w - v||`` that the next step's regularizer needs is summed in the same pass that writes ``w``
and ``v``. Inductor's CPU code for such a graph stages ``v`` in a temporary and copies it back
(2-3x slower, docs/PERFORMANCE.md); a 150-line C loop does it at the bandwidth limit.

The library is compiled with the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``)
and OpenMP, for the host CPU (``-march=native``), once per source, compiler and CPU, into
``$NEUMANN_OPTIMIZER_CACHE`` (default ``~/.cache/neumann_optimizer``); it takes about a second.
A cache directory is used only if it is this user's alone (created 0700; not writable by group
or others), and a cached library is loaded only if this user owns it and no one else can write
it; otherwise the kernel is compiled into a fresh private temporary directory (nothing planted
by another user on a shared machine is ever loaded).
Where that fails (no compiler, no OpenMP), :func:`library` returns ``None`` and the optimizer
uses its torch.compile'd path. ``NEUMANN_OPTIMIZER_NATIVE=0`` turns the kernel off.

The OpenMP runtime is ``libgomp.so.1``, the one torch's CPU build already loaded, so the kernel
and torch share one thread pool; it uses ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

try:
    import fcntl
except ImportError:  # (Windows, where the kernel is not built)
    fcntl = None  # type: ignore[assignment]

# (a private module: the optimizer's fused path calls step, squared_distance and all_finite)

DTYPES = {torch.float32: "f32", torch.float64: "f64"}
PHASE_CODES = {"burn_in": 0, "reset": 1, "neumann": 2}
_SOURCE = Path(__file__).with_name("_native.c")
_SERIAL = ["-O3", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c11"]
_COMMON = [*_SERIAL, "-fopenmp"]
# tried in order; 512-bit vectors measured 4-7% faster than 256-bit where the CPU has them; a
# compiler without OpenMP (Apple clang rejects -fopenmp) gets a serial kernel rather than none
_FLAG_SETS = (
    [*_COMMON, "-march=native", "-mprefer-vector-width=512"],
    [*_COMMON, "-march=native"],
    _COMMON,
    [*_SERIAL, "-march=native"],
    _SERIAL,
)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_path: Path | None = None
_tried = False
_reason = ""


def _cache_dir() -> Path | None:
    """``$NEUMANN_OPTIMIZER_CACHE``, else ``$XDG_CACHE_HOME`` or ``~/.cache``, ``/neumann_optimizer``;
    ``None`` where there is no home directory (a container without ``HOME``): then the temporary
    directory's private folder serves."""
    root = os.environ.get("NEUMANN_OPTIMIZER_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "neumann_optimizer"
    try:
        return Path.home() / ".cache" / "neumann_optimizer"
    except (RuntimeError, KeyError):  # no HOME and no password entry
        return None


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


def _uid() -> int:
    return os.getuid()


def _is_private_dir(d: Path) -> bool:
    """``d`` is a real directory (no symlink) owned by this user, writable by no one else, in a
    parent that no other user can swap it out of (not writable by others, or sticky as /tmp)."""
    try:
        st, parent = os.lstat(d), os.stat(d.parent)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != _uid() or st.st_mode & 0o022:
        return False
    return not (parent.st_mode & 0o022) or bool(parent.st_mode & stat.S_ISVTX) or parent.st_uid == _uid()


def _is_trusted_file(f: Path) -> bool:
    """``f`` is a regular file (no symlink) owned by this user and writable by no one else."""
    try:
        st = os.lstat(f)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == _uid() and not st.st_mode & 0o022


def _private_cache_dir() -> Path | None:
    """The cache directory (created 0700), or one under the temporary directory, if private to this
    user (:func:`_is_private_dir`); ``None`` if neither is: then nothing is cached or loaded from
    there. A directory someone else created or can write could hold a planted library."""
    for d in (_cache_dir(), Path(tempfile.gettempdir()) / f"neumann_optimizer-{_uid()}"):
        if d is None:
            continue
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            continue
        if _is_private_dir(d):
            return d
    return None


def _compile(cc: str, flags: list[str], out: Path) -> str:
    """Compile the kernel to ``out`` (mode 0700); return the compiler's complaint, '' on success."""
    proc = subprocess.run(
        [cc, *flags, str(_SOURCE), "-o", str(out), "-lm"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return f"{cc} {' '.join(flags)}: {proc.stderr.strip()[-400:]}"
    os.chmod(out, 0o700)
    return ""


def _key(*parts: bytes) -> str:
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]


@contextlib.contextmanager
def _build_lock(cache: Path | None) -> Iterator[None]:
    """Held while a process builds into ``cache``: processes that start together (torchrun's ranks)
    compile once; the others wait, then find the library (or the failure) the first one left."""
    if cache is None or fcntl is None:
        yield
        return
    with open(cache / ".build.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(cc: str, source: bytes) -> Path:
    """The compiled kernel: from the private cache if a trusted copy is there, else compiled into it,
    else (no private cache, or an untrusted file where the cached one would be) compiled into a
    fresh private temporary directory. A build that failed with every flag set leaves a record in the
    cache, keyed by the source, the compiler's identity and the CPU, and is not tried again there."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    identity = [source, (shutil.which(cc) or cc).encode(), version.encode(), _cpu_signature().encode()]
    cache = _private_cache_dir()
    with _build_lock(cache):
        failed = cache / f"neumann_kernel_{_key(*identity)}.failed" if cache is not None else None
        if failed is not None and _is_trusted_file(failed):
            raise RuntimeError(f"an earlier build failed (not retried; delete {failed} to retry): {failed.read_text()}")
        errors = []
        for flags in _FLAG_SETS:
            name = f"neumann_kernel_{_key(*identity, ' '.join(flags).encode())}.so"
            if cache is not None:
                target = cache / name
                if _is_trusted_file(target):
                    return target
                if not os.path.lexists(target):
                    with tempfile.TemporaryDirectory(dir=cache) as tmp:
                        out = Path(tmp) / name
                        err = _compile(cc, flags, out)
                        if not err:
                            os.replace(out, target)  # atomic: a reader never sees half a file
                            return target
                        errors.append(err)
                        continue
            private = Path(tempfile.mkdtemp(prefix="neumann_optimizer-"))  # 0700, ours alone
            atexit.register(shutil.rmtree, private, True)
            out = private / name
            err = _compile(cc, flags, out)
            if not err:
                return out
            errors.append(err)
        reason = "; ".join(errors)
        if failed is not None:
            failed.write_text(reason[-2000:])
            os.chmod(failed, 0o600)
        raise RuntimeError(reason)


def library_path() -> Path | None:
    """Where the loaded kernel library lies (``None`` if none is loaded)."""
    library()
    return _path


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, compiling it on the first call; ``None`` where unavailable."""
    global _lib, _path, _tried, _reason
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
            path = _build(cc, _SOURCE.read_bytes())
            lib = ctypes.CDLL(str(path))
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
            _lib, _path = lib, path
        except Exception as exc:  # any failure: the caller uses the torch.compile'd path
            _reason = f"{type(exc).__name__}: {exc}"
            _lib, _path = None, None
        _tried = True
        return _lib


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str:
    """Why :func:`library` returned ``None`` (empty if it did not)."""
    library()
    return _reason


def _dense(t: Tensor) -> bool:
    """``t``'s elements fill ``numel`` consecutive slots from its data pointer, in some order
    (contiguous, channels_last, any permutation): non-overlapping and dense."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(
        ((n, st) for n, st in zip(t.shape, t.stride(), strict=True) if n != 1), key=lambda d: d[1]
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def usable(*lists: list[Tensor]) -> bool:
    """The kernel applies to these tensors here: outside torch.compile (it is an opaque ctypes
    call), :func:`supports` them, and it compiled (:func:`available`)."""
    return not torch.compiler.is_compiling() and supports(*lists) and available()


def supports(*lists: list[Tensor]) -> bool:
    """Non-empty lists of CPU tensors, all float32 or all float64 (the kernel's types), each dense and
    non-overlapping, and the tensors at one position of the lists (a parameter's w, g, m, v) of equal
    strides: the kernel then runs over their memory as flat arrays, in the same order for each."""
    if not lists or not lists[0]:
        return False
    dtype = lists[0][0].dtype
    if dtype not in DTYPES:
        return False
    for same in zip(*lists, strict=True):
        first = same[0]
        if not (first.is_cpu and first.layout is torch.strided and first.dtype is dtype and _dense(first)):
            return False
        for t in same[1:]:
            if not (t.is_cpu and t.layout is torch.strided and t.dtype is dtype and t.stride() == first.stride()):
                return False
            if t.shape != first.shape:
                return False
    return True


def pointers(tensors: list[Tensor]) -> ctypes.Array:
    """The tensors' data pointers as a C array (``T **`` on the C side)."""
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def sizes(tensors: list[Tensor]) -> ctypes.Array:
    return (ctypes.c_int64 * len(tensors))(*[t.numel() for t in tensors])


def step(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor] | None,
    *,
    phase: str,
    lr: float,
    momentum: float,
    coef: float,
    keep: float,
    weight_decay: float,
) -> float:
    """One step of the group in place (``keep = 1 - gamma``); returns ``sum ||w - v||^2`` after it.
    ``vs=None``: the lean step (both regularizers 0: no ``v``, no norm; returns 0), reading ``g``,
    ``w``, ``m`` and writing ``w``, ``m`` as a fused SGD step with Nesterov momentum does.

    Bumps the version counters of the tensors it writes, as an in-place torch op would.
    """
    lib = library()
    assert lib is not None
    fn = getattr(lib, f"neumann_step_{DTYPES[params[0].dtype]}")
    arrays = (pointers(params), pointers(grads), pointers(ms), pointers(vs) if vs is not None else None, sizes(params))
    sq = fn(len(params), *arrays, PHASE_CODES[phase], lr, momentum, coef, keep, weight_decay, torch.get_num_threads())
    written = params if phase == "burn_in" else [*params, *ms, *(vs or [])]
    torch.autograd.graph.increment_version(written)  # as an in-place torch op would
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
