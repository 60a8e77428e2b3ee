"""One command for the day a GPU is lent: every number docs/PERFORMANCE.md leaves open on GPUs.

    python benchmarks/device_check.py                  # on a CUDA machine, within about 5 minutes
    python benchmarks/device_check.py --out runs/device_check.json

On a machine without CUDA it says so in one line and exits 0. ``--device cpu --sizes 0.01`` runs
every measurement that exists on CPU at a toy size (a smoke test of this script, not a result).

Measured, each optimizer on the same transformer-like parameters (``step_time.py``'s layout):

- **step time** (median of interleaved rounds) of ``Neumann()`` (its default path) and
  ``foreach=True``, against ``Adam(fused=True)``, ``Adam(foreach=True)`` and
  ``SGD(nesterov=True, fused=True)``, at 10M and 100M parameters, in float32 and bfloat16; and of
  ``fused=True`` (the compiled graph) and ``torch.compile(opt.step)`` at the first size in float32,
  with their compile times (compiling a 100-tensor step takes minutes);
- **host synchronisations per step** in steady state (``torch.cuda.set_sync_debug_mode("warn")``
  counts them as warnings);
- **graphs compiled** by ``torch.compile(opt.step)`` over a schedule with burn-in, ramp and resets;
- **peak memory per parameter** of one step (``torch.cuda.max_memory_allocated`` over what the
  parameters, gradients and state hold);
- **the optax step** against ``optax.adam`` (``optax_step_time.py``, ``optax_fusion_floor.py``), if
  JAX sees a GPU.

It prints one table and writes it as JSON. A benchmark, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from step_time import transformer_like  # noqa: E402

from neumann_optimizer import Neumann  # noqa: E402

NEU = dict(burn_in_steps=0, reset_steps=10**9, momentum_ramp_steps=1.0)  # timed in the regular phase


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


COMPILED = ("Neumann(fused=True) [compiled graph]", "torch.compile(Neumann.step), tensor lr")


def _optimizers(params: list[torch.nn.Parameter], lr: torch.Tensor) -> dict[str, Callable[[], Callable[[], None]]]:
    """name -> a maker of (one step) for each implementation, built on ``params``."""

    def plain(make: Callable[[], torch.optim.Optimizer]) -> Callable[[], Callable[[], None]]:
        return lambda: make().step

    def compiled() -> Callable[[], None]:
        opt = Neumann(params, lr=lr, foreach=True, **NEU)
        return torch.compile(opt.step)

    return {
        "Adam(fused=True)": plain(lambda: torch.optim.Adam(params, lr=1e-3, fused=True)),
        "Adam(foreach=True)": plain(lambda: torch.optim.Adam(params, lr=1e-3, foreach=True)),
        "SGD(nesterov, fused=True)": plain(
            lambda: torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True, fused=True)
        ),
        "Neumann() default": plain(lambda: Neumann(params, lr=1e-3, **NEU)),
        "Neumann(foreach=True)": plain(lambda: Neumann(params, lr=1e-3, foreach=True, **NEU)),
        # the trade of the default multi-tensor step (no host read, one pass more per buffer to mask a
        # skipped step) against a host read per step (raise: checked on the host, nothing to mask) and
        # against no check at all (ignore)
        "Neumann(foreach=True, nonfinite='raise')": plain(
            lambda: Neumann(params, lr=1e-3, foreach=True, nonfinite="raise", **NEU)
        ),
        "Neumann(foreach=True, nonfinite='ignore')": plain(
            lambda: Neumann(params, lr=1e-3, foreach=True, nonfinite="ignore", **NEU)
        ),
        "Neumann(fused=True) [compiled graph]": plain(lambda: Neumann(params, lr=1e-3, fused=True, **NEU)),
        "torch.compile(Neumann.step), tensor lr": compiled,
    }


def _syncs_per_step(step: Callable[[], None], device: str, steps: int = 5) -> float | None:
    """Host synchronisations per steady-state step (CUDA only: counted as sync-debug warnings)."""
    if not device.startswith("cuda"):
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def measure(millions: float, dtype: torch.dtype, device: str, rounds: int, steps: int, compiled: bool) -> list[dict]:
    params = transformer_like(int(millions * 1e6), device=device)
    params = [torch.nn.Parameter(p.detach().to(dtype)) for p in params]
    for p in params:
        p.grad = (torch.randn_like(p, dtype=torch.float32) * 1e-3).to(dtype)
    n = sum(p.numel() for p in params)
    lr = torch.tensor(1e-3, device=device)
    steppers: dict[str, Callable[[], None]] = {}
    rows: dict[str, dict] = {}
    for name, make in _optimizers(params, lr).items():
        if name in COMPILED and not compiled:
            continue
        try:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
            t0 = time.perf_counter()
            step = make()
            step()
            step()  # state created, compiled
            _sync(device)
            first = time.perf_counter() - t0
            peak = (torch.cuda.max_memory_allocated() - held) / n if device.startswith("cuda") else None
            steppers[name] = step
            rows[name] = dict(first_steps_s=first, peak_bytes_per_param=peak, syncs=_syncs_per_step(step, device))
        except Exception as exc:  # one implementation failing (a dtype fused Adam lacks) does not stop the rest
            rows[name] = dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, step in steppers.items():
            step()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / steps)
    ref = statistics.median(times["Adam(fused=True)"]) if times.get("Adam(fused=True)") else None
    out = []
    for name, row in rows.items():
        med = statistics.median(times[name]) if times.get(name) else None
        out.append(
            dict(
                millions=millions,
                dtype=str(dtype).replace("torch.", ""),
                optimizer=name,
                step_ms=med * 1e3 if med else None,
                ratio_to_fused_adam=med / ref if med and ref else None,
                **row,
            )
        )
    return out


class _Counter:
    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs += 1
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)


def graphs_over_a_schedule(device: str, steps: int = 60) -> int:
    """Graphs ``torch.compile(opt.step)`` compiles through burn-in, the ramp and resets, lr changing."""
    torch._dynamo.reset()
    params = [
        torch.nn.Parameter(torch.randn(64, 32, device=device)),
        torch.nn.Parameter(torch.randn(32, device=device)),
    ]
    opt = Neumann(params, lr=torch.tensor(0.05, device=device), burn_in_steps=3, momentum_ramp_steps=10, reset_steps=12)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + 0.01 * k))
    counter = _Counter()
    step = torch.compile(opt.step, backend=counter)
    for _ in range(steps):
        for p in params:
            p.grad = torch.sin(p.detach())
        step()
        sched.step()
    return counter.graphs


def optax_rows() -> list[str]:
    """The optax scripts' output, where JAX sees a GPU."""
    try:
        import jax
    except ImportError:
        return ["JAX is not installed: optax not measured"]
    if jax.devices()[0].platform != "gpu":
        return [f"JAX runs on {jax.devices()[0].platform}, not a GPU: optax not measured"]
    out = []
    for script in ("optax_step_time.py", "optax_fusion_floor.py"):
        proc = subprocess.run([sys.executable, str(HERE / script)], capture_output=True, text=True, timeout=300)
        out.append(f"$ python benchmarks/{script}\n{proc.stdout}{proc.stderr[-2000:]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke run of this script")
    ap.add_argument("--sizes", type=float, nargs="+", default=[10, 100], help="millions of parameters (10 100)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round (default: 5)")
    ap.add_argument("--out", type=Path, default=Path("runs/device_check.json"), help="the JSON written")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("device_check: no CUDA device here; nothing measured (run it on a GPU machine)")
        return 0
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU (smoke run)"
    print(f"torch {torch.__version__}, {name}")
    rows = []
    for k, millions in enumerate(args.sizes):
        for dtype in (torch.float32, torch.bfloat16):
            # the compiled rows at the first size, in float32 only: compiling a 100-tensor step takes
            # minutes (4 on 2 CPU cores), and the 5-minute budget holds one such compilation per path
            compiled = k == 0 and dtype == torch.float32
            rows += measure(millions, dtype, args.device, args.rounds, args.steps, compiled)
    graphs = graphs_over_a_schedule(args.device)
    optax = optax_rows()
    print("| params | dtype | optimizer | step (ms) | x Adam(fused) | syncs/step | peak B/param | first 2 steps (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['millions']:g}M | {r['dtype']} | {r['optimizer']} | {r['error']} | | | | |")
            continue

        def num(x: float | None, f: str) -> str:
            return format(x, f) if x is not None else "—"

        print(
            f"| {r['millions']:g}M | {r['dtype']} | {r['optimizer']} | {num(r['step_ms'], '.2f')} | "
            f"{num(r['ratio_to_fused_adam'], '.2f')} | {num(r['syncs'], '.1f')} | "
            f"{num(r['peak_bytes_per_param'], '.1f')} | {r['first_steps_s']:.1f} |"
        )
    print(f"\ntorch.compile(opt.step) over 60 steps (burn-in, ramp, 4 resets, lr changing): {graphs} graphs")
    for block in optax:
        print("\n" + block)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(dict(device=name, torch=torch.__version__, rows=rows, graphs=graphs, optax=optax), indent=1)
    )
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
