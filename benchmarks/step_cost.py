"""What one optimizer step costs, counted instead of timed: kernels dispatched, bytes read plus
written per parameter, host reads, and the peak of temporaries, for every Neumann path and for
torch.optim's Adam, AdamW and SGD(nesterov) side by side.

    python benchmarks/step_cost.py                 # float32 and bfloat16; 99 and 1,000 tensors; 1 and 2 groups
    python benchmarks/step_cost.py --json out.json

A ``TorchDispatchMode`` sees every aten op a step dispatches, on any device, so the counts hold on a
GPU as they do here (the device does not change which kernels a path launches; a foreach op is
counted once, though on CUDA it launches one kernel per chunk of tensors). Per op: the bytes of its
tensor arguments are read, the bytes of the arguments its schema marks as written and of its fresh
outputs are written (so ``Adam(fused=True)`` is charged a write of its gradients, which its schema
marks as mutable for unscaling). Views and other metadata-only ops are not kernels. Host reads are
``_local_scalar_dense`` (``item()``, ``bool()``) plus calls of ``Tensor.tolist``. Temporaries are the
fresh outputs alive at once during the step (a ``weakref.finalize`` on each), at their peak.

Two paths are opaque to the dispatch mode and are counted from what their code touches instead:
the C kernel on CPU (a ctypes call: its loops read ``g``, ``w``, ``m``, ``v`` and write ``w``, ``m``,
``v`` in one pass, ``g`` once more for its finite check) and ``torch.compile``d graphs (inductor's
fused loops; not listed here). The step counted is a regular Neumann step (past the burn-in, not a
reset), after warm-up steps; gradients are set before the mode starts. This is a benchmark, not a
test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
from step_time import patched
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from neumann_optimizer import Neumann, _native
from neumann_optimizer import functional as F

METADATA_OPS = {"detach", "alias", "lift_fresh", "view", "_unsafe_view", "as_strided", "expand", "t", "permute"}


@dataclass
class Cost:
    kernels: int = 0
    read: int = 0
    written: int = 0
    host_reads: int = 0
    live: int = 0
    peak: int = 0


class CountingMode(TorchDispatchMode):
    def __init__(self, cost: Cost) -> None:
        super().__init__()
        self.cost = cost

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "is_nonzero", "item"):
            self.cost.host_reads += 1
            return out
        if getattr(func, "is_view", False) or name in METADATA_OPS:
            return out
        self.cost.kernels += 1
        flat_in = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        self.cost.read += sum(t.nbytes for t in flat_in)
        written = []
        for arg, value in zip(func._schema.arguments, args, strict=False):
            if arg.alias_info is not None and arg.alias_info.is_write:
                written += [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
        inputs = {id(t) for t in flat_in}
        fresh = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and id(t) not in inputs]
        self.cost.written += sum(t.nbytes for t in written) + sum(t.nbytes for t in fresh)
        for t in fresh:
            self.cost.live += t.nbytes
            weakref.finalize(t, self._free, t.nbytes)
        self.cost.peak = max(self.cost.peak, self.cost.live)
        return out

    def _free(self, nbytes: int) -> None:
        self.cost.live -= nbytes


@contextlib.contextmanager
def counted_kernel(cost: Cost) -> Iterator[None]:
    """Count the C kernel's calls from what its loops touch (a ctypes call is opaque to dispatch)."""
    saved = {k: getattr(_native, k) for k in ("step", "all_finite", "squared_distance")}

    def touch(reads: list, writes: list) -> None:
        cost.kernels += 1
        cost.read += sum(t.nbytes for ts in reads for t in ts)
        cost.written += sum(t.nbytes for ts in writes for t in ts)

    def step(w: list, g: list, m: list, v: list | None, **kw: Any) -> float:
        touch([g, w, m, v or []], [w, m, v or []])  # (v None: the lean step, no v)
        return saved["step"](w, g, m, v, **kw)

    def all_finite(g: list) -> bool:
        touch([g], [])
        return saved["all_finite"](g)

    def squared_distance(w: list, v: list) -> float:
        touch([w, v], [])
        return saved["squared_distance"](w, v)

    fns = dict(step=step, all_finite=all_finite, squared_distance=squared_distance)
    with mock.patch.multiple(_native, **fns):
        yield


@contextlib.contextmanager
def counted_tolist(cost: Cost) -> Iterator[None]:
    real = torch.Tensor.tolist

    def tolist(self: torch.Tensor) -> Any:
        cost.host_reads += 1
        return real(self)

    torch.Tensor.tolist = tolist  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.tolist = real  # type: ignore[method-assign]


def shapes(n_tensors: int, total: int) -> list[tuple[int, ...]]:
    """``n_tensors`` tensors of about ``total`` scalars: a third matrices, the rest vectors (biases, norms)."""
    mats = max(1, n_tensors // 3)
    vec = 256
    side = max(1, int(math.sqrt(max(total - (n_tensors - mats) * vec, mats) / mats)))
    return [(side, side)] * mats + [(vec,)] * (n_tensors - mats)


def params_for(n_tensors: int, total: int, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes(n_tensors, total)]


NEU = dict(lr=0.01, burn_in_steps=1, reset_steps=10**6, momentum_ramp_steps=1.0)


def optimizers() -> dict[str, tuple[Callable[[list], torch.optim.Optimizer], dict[str, Any]]]:
    """name -> (make(params or groups), module patches while it runs)."""
    return {
        "Neumann() on CPU (C kernel)": (lambda p: Neumann(p, **NEU), {}),
        "Neumann(foreach=True), host schedule": (lambda p: Neumann(p, foreach=True, fused=False, **NEU), {}),
        "Neumann() on accelerators (multi-tensor, host schedule)": (
            lambda p: Neumann(p, **NEU),
            dict(available=lambda: False),
        ),
        "Neumann(capturable=True), device schedule": (lambda p: Neumann(p, capturable=True, **NEU), {}),
        "Neumann(foreach=False)": (lambda p: Neumann(p, foreach=False, fused=False, **NEU), {}),
        "Neumann lean, C kernel": (lambda p: Neumann(p, cubic_weight=0.0, **NEU), {}),
        "Neumann lean, foreach": (lambda p: Neumann(p, cubic_weight=0.0, foreach=True, fused=False, **NEU), {}),
        "Neumann lean on accelerators (multi-tensor)": (
            lambda p: Neumann(p, cubic_weight=0.0, **NEU),
            dict(available=lambda: False),
        ),
        "Adam(fused=True)": (lambda p: torch.optim.Adam(p, lr=1e-3, fused=True), {}),
        "Adam(foreach=True)": (lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True), {}),
        "AdamW(fused=True)": (lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True), {}),
        "SGD(nesterov, foreach=True)": (
            lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True, foreach=True),
            {},
        ),
        "SGD(nesterov, fused=True)": (
            lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True, fused=True),
            {},
        ),
    }


def measure(make: Callable, patches: dict, n_tensors: int, groups: int, dtype: torch.dtype, total: int) -> dict:
    params = params_for(n_tensors, total, dtype)
    numel = sum(p.numel() for p in params)
    split = [params[i::groups] for i in range(groups)]
    with patched(**patches):
        opt = make([{"params": ps} for ps in split])
        for _ in range(3):  # past the burn-in and the first reset; state created
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
        for p in params:
            p.grad = torch.ones_like(p)
        cost = Cost()
        with counted_kernel(cost), counted_tolist(cost), CountingMode(cost):
            opt.step()
    return dict(
        kernels=cost.kernels,
        bytes_per_param=(cost.read + cost.written) / numel,
        host_reads=cost.host_reads,
        peak_temporaries_per_param=cost.peak / numel,
        params=numel,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total", type=int, default=2**20, help="scalars per model (default 2^20)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument(
        "--chunk",
        type=int,
        help="elements per chunk of the multi-tensor step (functional.UPCAST_CHUNK, default 2^24): "
        "below --total, a group of several chunks",
    )
    parser.add_argument("--only", nargs="*", help="rows whose name contains one of these (the baseline always runs)")
    args = parser.parse_args()
    if args.chunk:
        F.UPCAST_CHUNK = args.chunk
    rows = []
    print(
        "| step | dtype | tensors | groups | kernels | bytes/param | vs Adam(fused) | host reads "
        "| temporaries B/param |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    baseline = "Adam(fused=True)"  # measured first in each block: ratios are to it, in the same run
    for dtype in (torch.float32, torch.bfloat16):
        for n_tensors in (99, 1000):
            for groups in (1, 2):
                table = optimizers()
                adam_bytes = math.nan
                names = [n for n in table if n != baseline and (not args.only or any(o in n for o in args.only))]
                for name in [baseline, *names]:
                    make, patches = table[name]
                    try:
                        r = measure(make, patches, n_tensors, groups, dtype, args.total)
                    except (RuntimeError, TypeError) as exc:  # (a baseline without that dtype here)
                        print(f"| {name} | {str(dtype)[6:]} | {n_tensors} | {groups} | n/a: {str(exc)[:60]} | | | | |")
                        continue
                    if name == baseline:
                        adam_bytes = r["bytes_per_param"]
                    r["bytes_vs_adam_fused"] = r["bytes_per_param"] / adam_bytes
                    row = dict(step=name, dtype=str(dtype)[6:], tensors=n_tensors, groups=groups, **r)
                    rows.append(row)
                    print(
                        f"| {name} | {row['dtype']} | {n_tensors} | {groups} | {r['kernels']} | "
                        f"{r['bytes_per_param']:.1f} | {r['bytes_vs_adam_fused']:.2f}x | {r['host_reads']} | "
                        f"{r['peak_temporaries_per_param']:.1f} |",
                        flush=True,
                    )
    if args.json:
        with open(args.json, "w") as f:
            chunk = F.UPCAST_CHUNK
            json.dump(dict(total=args.total, chunk=chunk, torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
