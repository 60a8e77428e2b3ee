"""Step time of the Neumann optimizer against torch.optim.Adam and SGD(nesterov), side by side.

    python benchmarks/step_time.py                      # 1M, 10M, 50M parameters on CPU
    python benchmarks/step_time.py --sizes 10 --device cuda

Parameters are laid out like a transformer (about 100 tensors: embedding, per-layer attention and
MLP matrices, biases and norm vectors). Every implementation is timed in the same process, runs
interleaved round by round (memory bandwidth on a shared machine swings from minute to minute),
and the median per-step time is reported with its ratio to ``Adam(fused=True)``; each round
starts with one untimed step per optimizer. Neumann is timed
in its regular (regularized) phase, the most expensive one. A memory-bandwidth figure measured in
the same run (``a = b + s * c`` over a large buffer) converts times into implied bytes moved per
parameter: a Neumann or Adam step must move at least 28 bytes per float32 parameter (read g, w,
m, v; write w, m, v), a lean Neumann step (both regularizers 0) or an SGD(nesterov) step 20 (read
g, w, m; write w, m). This is a benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch

from neumann_optimizer import Neumann, _native


def transformer_like(total: int, layers: int = 8, device: str = "cpu") -> list[torch.nn.Parameter]:
    """About ``total`` float32 parameters in 12 tensors per layer plus embedding and final norm."""
    vocab_frac = 0.1
    d = int(math.sqrt((1 - vocab_frac) * total / (12 * layers)))
    vocab = max(1, int(vocab_frac * total / d))
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
    shapes += [(d,), (d,)]
    g = torch.Generator().manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(*s, generator=g).to(device) * 0.02)
        p.grad = torch.randn(*s, generator=g).to(device) * 1e-3
        params.append(p)
    return params


@contextmanager
def patched(**values: object) -> Iterator[None]:
    """Inside: ``neumann_optimizer._native`` with these attributes."""
    real = {k: getattr(_native, k) for k in values}
    for k, v in values.items():
        setattr(_native, k, v)
    try:
        yield
    finally:
        for k, v in real.items():
            setattr(_native, k, v)


class CompiledGraph(Neumann):
    """``Neumann(fused=True)`` on its torch.compile'd graph, timed on CPU too (as where the CPU
    kernel is unavailable)."""

    patches: ClassVar[dict[str, object]] = dict(available=lambda: False)

    def step(self, closure=None):  # type: ignore[override]
        with patched(**self.patches):
            return super().step(closure)


def compiled(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``opt`` whose ``step`` is ``torch.compile(opt.step)``."""
    opt.step = torch.compile(opt.step)  # type: ignore[method-assign]
    return opt


def make_optimizers(
    params: list[torch.nn.Parameter], device: str, with_compile: bool = False
) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    neu = dict(lr=1e-3, burn_in_steps=0, reset_steps=10**9, momentum_ramp_steps=1)
    lean = dict(neu, cubic_weight=0.0, repulsive_weight=0.0)
    kernel = " [CPU kernel]" if device == "cpu" and _native.available() else " [compiled graph]"
    impls: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "Adam(fused=True)": lambda: torch.optim.Adam(params, lr=1e-3, fused=True),
        "Adam(foreach=True)": lambda: torch.optim.Adam(params, lr=1e-3, foreach=True),
        "Adam() default": lambda: torch.optim.Adam(params, lr=1e-3),
        "SGD(nesterov, fused=True)": lambda: torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True, fused=True),
        "SGD(nesterov, foreach=True)": lambda: torch.optim.SGD(
            params, lr=1e-3, momentum=0.9, nesterov=True, foreach=True
        ),
        "Neumann(fused=True)" + kernel: lambda: Neumann(params, fused=True, **neu),
        "Neumann(fused=True, nonfinite='ignore')" + kernel: lambda: Neumann(
            params, fused=True, nonfinite="ignore", **neu
        ),
        "Neumann(foreach=True)": lambda: Neumann(params, foreach=True, fused=False, **neu),
        "Neumann(foreach=True, nonfinite='ignore')": lambda: Neumann(
            params, foreach=True, fused=False, nonfinite="ignore", **neu
        ),
        "Neumann(foreach=False)": lambda: Neumann(params, foreach=False, fused=False, **neu),
        "Neumann() default": lambda: Neumann(params, **neu),
        # the lean step (both regularizers 0): no v, no norm; its floor is fused SGD(nesterov)
        "Neumann lean (cubic=repulsive=0)" + kernel: lambda: Neumann(params, fused=True, **lean),
        "Neumann lean, nonfinite='ignore'" + kernel: lambda: Neumann(params, fused=True, nonfinite="ignore", **lean),
        "Neumann lean, foreach=True": lambda: Neumann(params, foreach=True, fused=False, **lean),
    }
    # the device schedule run eagerly (no host read: what a CUDA graph captures)
    impls["Neumann(capturable=True)"] = lambda: Neumann(params, capturable=True, **neu)
    if kernel == " [CPU kernel]":  # the compiled graph too, as used where the kernel is unavailable
        impls["Neumann(fused=True) [compiled graph]"] = lambda: CompiledGraph(params, fused=True, **neu)
        impls["Neumann(fused=True, nonfinite='ignore') [compiled graph]"] = lambda: CompiledGraph(
            params, fused=True, nonfinite="ignore", **neu
        )
    # torch.compile(opt.step), as torch's tutorials compile Adam (a tensor lr for Neumann, as its README
    # says); the "first 2 steps" column holds the compile time
    if not with_compile:  # (compiling them takes minutes on a small CPU)
        return impls
    lr_t = dict(neu, lr=torch.tensor(1e-3))
    impls["torch.compile(Adam(foreach=True).step)"] = lambda: compiled(torch.optim.Adam(params, lr=1e-3, foreach=True))
    impls["torch.compile(Adam(fused=True).step)"] = lambda: compiled(torch.optim.Adam(params, lr=1e-3, fused=True))
    impls["torch.compile(SGD(nesterov, foreach=True).step)"] = lambda: compiled(
        torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True, foreach=True)
    )
    impls["torch.compile(SGD(nesterov, fused=True).step)"] = lambda: compiled(
        torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True, fused=True)
    )
    impls["torch.compile(Neumann().step)"] = lambda: compiled(Neumann(params, **lr_t))
    impls["torch.compile(Neumann lean.step)"] = lambda: compiled(
        Neumann(params, **dict(lr_t, cubic_weight=0.0, repulsive_weight=0.0))
    )
    return impls


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bandwidth(device: str, n: int = 64 * 2**20, reps: int = 10) -> float:
    """GB/s of ``a = b + s * c`` (3 float32 arrays of ``n`` elements moved per pass), median."""
    b = torch.randn(n, device=device)
    c = torch.randn(n, device=device)
    a = torch.empty_like(b)
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        torch.add(b, c, alpha=0.5, out=a)
        sync(device)
        times.append(time.perf_counter() - t)
    return 3 * 4 * n / statistics.median(times) / 1e9


def bench_size(
    total: int, device: str, rounds: int, steps: int, only: list[str] | None = None, with_compile: bool = False
) -> None:
    params = transformer_like(total, device=device)
    n = sum(p.numel() for p in params)
    impls = make_optimizers(params, device, with_compile)
    if only:
        impls = {k: f for k, f in impls.items() if k == "Adam(fused=True)" or any(o in k for o in only)}
    opts: dict[str, torch.optim.Optimizer] = {}
    first: dict[str, float] = {}
    state_bytes: dict[str, float] = {}
    snapshot = [p.detach().clone() for p in params]
    failed: dict[str, str] = {}
    for name, make in impls.items():
        opt = make()
        sync(device)
        t = time.perf_counter()
        try:
            opt.step()  # state creation; for Neumann the reset step (t = 1)
            opt.step()  # first regularized step (compiles the fused path)
        except Exception as e:  # torch.compile of a baseline can fail on some devices: say so, time the rest
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
            continue
        sync(device)
        first[name] = time.perf_counter() - t
        opts[name] = opt
        state_bytes[name] = sum(
            v.numel() * v.element_size()
            for s in opt.state.values()
            for v in s.values()
            if torch.is_tensor(v) and v.numel() > 1
        )
        with torch.no_grad():  # each optimizer starts from the same weights
            for p, s in zip(params, snapshot, strict=True):
                p.copy_(s)
    times: dict[str, list[float]] = {name: [] for name in opts}
    bws = []
    for _ in range(rounds):
        bws.append(bandwidth(device))
        for name, opt in list(opts.items()):
            # untimed: the other optimizers' steps in between changed the shared parameters, which
            # no real run does (Neumann's CPU kernel then sums ||w - v|| afresh once)
            try:
                opt.step()  # (a compiled step may recompile here, and fail)
            except Exception as e:
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
                del opts[name]
                continue
            sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                opt.step()
            sync(device)
            times[name].append((time.perf_counter() - t) / steps)
    bw = statistics.median(bws)
    ref = statistics.median(times["Adam(fused=True)"])
    print(
        f"\n### {n / 1e6:.1f}M parameters in {len(params)} tensors ({device}), "
        f"{rounds} interleaved rounds x {steps} steps; bandwidth {bw:.1f} GB/s (a = b + s*c)\n"
    )
    print(
        "| optimizer | median step (ms) | ratio to Adam(fused) | implied bytes/param | state bytes/param | "
        "first 2 steps (s) |"
    )
    print("|---|---|---|---|---|---|")
    for name in impls:
        if name in failed:
            print(f"| {name} | failed: {failed[name]} | | | | |")
            continue
        med = statistics.median(times[name])
        print(
            f"| {name} | {med * 1e3:.2f} | {med / ref:.2f} | {med * bw * 1e9 / n:.1f} | "
            f"{state_bytes[name] / n:.1f} | {first[name]:.2f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 50], help="millions of parameters")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=None, help="substrings of the implementations to time")
    ap.add_argument(
        "--compile", action="store_true", help="also torch.compile(opt.step) of Neumann, Adam and SGD (minutes)"
    )
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for size in args.sizes:
        bench_size(int(size * 1e6), args.device, args.rounds, args.steps, args.only, args.compile)


if __name__ == "__main__":
    main()
