"""One command for the day a GPU is lent: first check every path on the device, then time it.

    python benchmarks/device_check.py                  # on a CUDA machine, within 5 minutes
    python benchmarks/device_check.py --out runs/device_check.json
    python benchmarks/device_check.py --device cpu --sizes 0.01   # a smoke run of this script

On a machine without CUDA it says so in one line and exits 0.

1. **check** (exit 1 on any failure, before anything is timed): each path of the step
   (``PATHS``: for-loop, multi-tensor with the host schedule, ``capturable=True``,
   ``fused=True``'s compiled graph, ``torch.compile(opt.step)``) runs 10 steps in float32, bfloat16
   and float16 on the device, through burn-in, resets and one step whose gradient holds a NaN,
   against the float64 reference written from the SPEC (``tests/reference.py``), fed the same
   rounded gradients and skipping the NaN step. The gradients' L1 norm (about 2.5e5) overflows
   float16, so a finite check that reduces in float16 fails here.
2. **time**: the median step of interleaved rounds of each path and of ``Adam(fused=True)``,
   ``Adam(foreach=True)``, ``SGD(nesterov=True, fused=True)`` on transformer-like parameters
   (``step_time.py``'s layout) at each size, float32 and bfloat16; with each, the kernels one
   steady-state step launches (``torch.profiler``; on CPU the aten ops), the host synchronisations
   per step (CUDA's sync debug mode), the peak memory of the first steps per parameter and the
   time of those first steps (state, compilation). The compiled paths are timed at the first size
   in float32 only: compiling a 100-tensor step takes a minute or more.
3. **graphs**: how many graphs ``torch.compile(opt.step)`` compiles over a schedule with burn-in,
   ramp, resets and a changing lr.
4. **optax**: ``optax_step_time.py`` and ``optax_fusion_floor.py`` where JAX sees a GPU.

Each section stops at its own time limit (``LIMITS``, seconds; what it did not reach is listed as
such), and the JSON is rewritten after every row, so a run cut short still returns what it measured.
A benchmark besides the checks: the timings assert nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from reference import RefGroup  # noqa: E402
from step_time import transformer_like  # noqa: E402

from neumann_optimizer import Neumann  # noqa: E402

LIMITS = dict(check=100.0, time=110.0, graphs=40.0, optax=40.0)
NEU = dict(burn_in_steps=0, reset_steps=10**9, momentum_ramp_steps=1.0)  # timed in the regular phase
CHECK_HP = dict(lr=0.05, burn_in_steps=2, reset_steps=3, reset_growth=2.0, momentum=(0.5, 0.9))
CHECK_HP.update(momentum_ramp_steps=2.0, cubic_weight=0.05, repulsive_weight=1e-3, ema_decay=0.9)
# name -> (Neumann's keyword arguments, whether opt.step is torch.compile'd)
PATHS: dict[str, tuple[dict[str, Any], bool]] = {
    "Neumann(foreach=False) [for-loop]": (dict(foreach=False), False),
    "Neumann() default": ({}, False),
    "Neumann(nonfinite='ignore')": (dict(nonfinite="ignore"), False),
    "Neumann(capturable=True)": (dict(capturable=True), False),
    "Neumann(fused=True) [compiled graph]": (dict(fused=True), False),
    "torch.compile(Neumann.step)": ({}, True),
}
COMPILED = {name for name, (kw, comp) in PATHS.items() if comp or kw.get("fused")}
BASELINES: dict[str, Callable[[list], torch.optim.Optimizer]] = {
    "Adam(fused=True)": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
    "Adam(foreach=True)": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
    "SGD(nesterov, fused=True)": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, nesterov=True, fused=True),
}


class Report:
    """The rows so far, rewritten to ``path`` after each one."""

    def __init__(self, path: Path, **head: Any) -> None:
        self.path, self.data = path, dict(head, check=[], time=[], graphs=None, optax=[], unreached=[])
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, section: str, row: Any) -> None:
        if isinstance(self.data[section], list):
            self.data[section].append(row)
        else:
            self.data[section] = row
        self.path.write_text(json.dumps(self.data, indent=1))


class Section:
    def __init__(self, name: str, report: Report) -> None:
        self.name, self.report, self.end = name, report, time.perf_counter() + LIMITS[name]

    def open(self, what: str) -> bool:
        if time.perf_counter() < self.end:
            return True
        self.report.add("unreached", f"{self.name}: {what} (past its {LIMITS[self.name]:g} s)")
        print(f"  [{self.name}] time limit: {what} not reached")
        return False


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _stepper(name: str, params: list[torch.nn.Parameter], **hp: Any) -> tuple[Neumann, Callable[[], Any]]:
    kw, comp = PATHS[name]
    opt = Neumann(params, **{**hp, **kw})
    return opt, (torch.compile(opt.step) if comp else opt.step)


def check_path(name: str, dtype: torch.dtype, device: str, steps: int = 10, nan_at: int = 6) -> dict:
    """``steps`` steps of path ``name`` against the float64 reference; the gradient of step
    ``nan_at`` holds a NaN (a skipped step) unless the path ignores non-finite gradients."""
    rng = np.random.default_rng(0)
    shapes = [(600, 512), (512,)]
    lowp = torch.tensor(0.0, dtype=dtype)
    w0 = [torch.as_tensor(rng.normal(size=s)).to(dtype) for s in shapes]
    params = [torch.nn.Parameter(w.to(device)) for w in w0]
    hp = CHECK_HP
    ref = RefGroup.from_hyperparameters(np.concatenate([w.double().numpy().ravel() for w in w0]), hp)
    opt, step = _stepper(name, params, **hp)
    skip = PATHS[name][0].get("nonfinite") != "ignore"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip warning
        for i in range(1, steps + 1):
            grads = [torch.as_tensor(rng.normal(size=s)).to(lowp.dtype) for s in shapes]
            if i == nan_at and skip:
                grads[0][3, 7] = float("nan")
            for p, g in zip(params, grads, strict=True):
                p.grad = g.to(device)
            step()
            if not (i == nan_at and skip):
                ref.step(np.concatenate([g.double().numpy().ravel() for g in grads]))
        group = opt.state_dict()["param_groups"][0]  # (reads the device counters where they live)
    got = torch.cat([p.detach().double().cpu().reshape(-1) for p in params]).numpy()
    err = float(np.max(np.abs(got - ref.w)))
    scale = float(np.max(np.abs(ref.w)))
    # storage rounding of w, m, v each step, relative to the weights: on CPU the error was about a
    # tenth of this (0.6 eps x the largest weight after 10 steps, in each dtype)
    tol = 2 * torch.finfo(dtype).eps * math.sqrt(steps) * scale
    expect = (steps - 1, 1) if skip else (steps, 0)
    ok = math.isfinite(err) and err <= tol and (group["step"], group["skipped_steps"]) == expect
    return dict(
        path=name,
        dtype=str(dtype).replace("torch.", ""),
        max_abs_err=err,
        tol=tol,
        step=group["step"],
        skipped=group["skipped_steps"],
        expected=list(expect),
        ok=ok,
    )


def _kernels(step: Callable[[], Any], device: str) -> int:
    """Kernels one step launches (CUDA), or aten ops it dispatches (CPU smoke runs)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        step()
        _sync(device)
    if cuda:
        return sum(e.device_type == DeviceType.CUDA for e in prof.events())
    return sum(e.name.startswith("aten::") for e in prof.events())


def _syncs(step: Callable[[], Any], device: str, steps: int = 3) -> float | None:
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


def time_size(millions: float, dtype: torch.dtype, device: str, args: Any, sec: Section, compiled: bool) -> None:
    params = [torch.nn.Parameter(p.detach().to(device, dtype)) for p in transformer_like(int(millions * 1e6))]
    for p in params:
        p.grad = (torch.randn_like(p, dtype=torch.float32) * 1e-3).to(dtype)
    n = sum(p.numel() for p in params)
    makers: dict[str, Callable[[], Callable[[], Any]]] = {k: (lambda f=f: f(params).step) for k, f in BASELINES.items()}
    for name in PATHS:
        if compiled or name not in COMPILED:
            makers[name] = lambda name=name: _stepper(name, params, lr=1e-3, **NEU)[1]
    steppers, rows = {}, {}
    for name, make in makers.items():
        if not sec.open(f"{millions:g}M {dtype} {name}"):
            break
        try:
            cuda = device.startswith("cuda")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated() if cuda else 0
            t0 = time.perf_counter()
            step = make()
            step()
            step()  # state created, compiled
            _sync(device)
            first = time.perf_counter() - t0
            peak = (torch.cuda.max_memory_allocated() - held) / n if cuda else None
            steppers[name] = step
            rows[name] = dict(
                first_steps_s=first,
                peak_bytes_per_param=peak,
                kernels=_kernels(step, device),
                syncs=_syncs(step, device),
            )
        except Exception as exc:  # one implementation failing (a dtype fused Adam lacks) does not stop the rest
            rows[name] = dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(args.rounds):
        for name, step in steppers.items():
            step()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / args.steps)
    adam = statistics.median(times["Adam(fused=True)"]) if times.get("Adam(fused=True)") else None
    for name, row in rows.items():
        med = statistics.median(times[name]) if times.get(name) else None
        full = dict(millions=millions, dtype=str(dtype).replace("torch.", ""), optimizer=name, **row)
        full.update(step_ms=med * 1e3 if med else None, ratio_to_fused_adam=med / adam if med and adam else None)
        sec.report.add("time", full)
        print("  " + _row(full))


COLUMNS = "params|dtype|optimizer|step (ms)|x Adam(fused)|kernels/step|syncs/step|peak B/param|first 2 steps (s)"


def _row(r: dict) -> str:
    if "error" in r:
        return f"| {r['millions']:g}M | {r['dtype']} | {r['optimizer']} | {r['error']} | | | | | |"

    def num(x: float | None, f: str) -> str:
        return format(x, f) if x is not None else "—"

    return (
        f"| {r['millions']:g}M | {r['dtype']} | {r['optimizer']} | {num(r['step_ms'], '.2f')} | "
        f"{num(r['ratio_to_fused_adam'], '.2f')} | {r['kernels']} | {num(r['syncs'], '.1f')} | "
        f"{num(r['peak_bytes_per_param'], '.1f')} | {r['first_steps_s']:.1f} |"
    )


def graphs_over_a_schedule(device: str, steps: int = 40) -> int:
    """Graphs ``torch.compile(opt.step)`` compiles through burn-in, the ramp and resets, lr changing."""
    torch._dynamo.reset()
    params = [
        torch.nn.Parameter(torch.randn(64, 32, device=device)),
        torch.nn.Parameter(torch.randn(32, device=device)),
    ]
    opt = Neumann(params, lr=torch.tensor(0.05, device=device), burn_in_steps=3, momentum_ramp_steps=10, reset_steps=6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + 0.01 * k))
    graphs = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        graphs.append(1)
        return compile_fx(gm, example_inputs)

    step = torch.compile(opt.step, backend=counting)
    for _ in range(steps):
        for p in params:
            p.grad = torch.sin(p.detach())
        step()
        sched.step()
    return len(graphs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke run of this script")
    ap.add_argument("--sizes", type=float, nargs="+", default=[10, 100], help="millions of parameters (10 100)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round (default: 5)")
    ap.add_argument("--out", type=Path, default=Path("runs/device_check.json"), help="the JSON written")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("device_check: no CUDA device here; nothing checked or measured (run it on a GPU machine)")
        return 0
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU (smoke run)"
    print(f"torch {torch.__version__}, {name}")
    report = Report(args.out, device=name, torch=torch.__version__)
    sec = Section("check", report)
    print("## check: every path against the float64 reference (10 steps, one NaN gradient)")
    for path in PATHS:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            if not sec.open(f"{path} {dtype}"):
                break
            try:
                row = check_path(path, dtype, args.device)
            except Exception as exc:
                row = dict(path=path, dtype=str(dtype), ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            report.add("check", row)
            print(f"  {'ok  ' if row['ok'] else 'FAIL'} {row}")
    failed = [r for r in report.data["check"] if not r["ok"]]
    if failed:
        print(f"device_check: {len(failed)} check(s) failed; nothing timed ({args.out})")
        return 1
    print("## time")
    print(f"| {COLUMNS.replace('|', ' | ')} |\n|{'---|' * (COLUMNS.count('|') + 1)}")
    sec = Section("time", report)
    for k, millions in enumerate(args.sizes):
        for dtype in (torch.float32, torch.bfloat16):
            if sec.open(f"{millions:g}M {dtype}"):
                time_size(millions, dtype, args.device, args, sec, compiled=k == 0 and dtype == torch.float32)
    sec = Section("graphs", report)
    if sec.open("graphs over a schedule"):
        report.add("graphs", graphs_over_a_schedule(args.device))
        print(f"torch.compile(opt.step) over 40 steps (burn-in, ramp, resets, lr changing): {report.data['graphs']}")
    if args.device.startswith("cuda") and sec.open("CUDA graph"):
        report.add("cuda_graph", cuda_graph_replay(args.device))
        print(f"capturable=True captured in a CUDA graph and replayed: {report.data['cuda_graph']}")
    optax_rows(Section("optax", report))
    print(f"\nwritten: {args.out}")
    return 0 if report.data.get("cuda_graph", {}).get("ok", True) else 1


def cuda_graph_replay(device: str, steps: int = 12) -> dict:
    """``capturable=True``'s step captured once in a CUDA graph (after 3 eager steps on a side
    stream, torch's recipe) and replayed, against the same steps taken eagerly: burn-in and resets."""
    hp = dict(lr=0.05, burn_in_steps=2, reset_steps=2, momentum_ramp_steps=2.0, cubic_weight=0.05, capturable=True)
    g = torch.Generator(device=device).manual_seed(0)
    grads = [[torch.randn(s, device=device, generator=g) for s in ((256, 64), (64,))] for _ in range(steps)]
    runs = []
    try:
        for capture in (False, True):
            params = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads[0]]
            opt = Neumann(params, **hp)
            graph = None
            for i, gs in enumerate(grads):
                for p, x in zip(params, gs, strict=True):
                    if p.grad is None:
                        p.grad = x.clone()
                    else:
                        p.grad.copy_(x)  # a captured graph reads the same .grad tensors
                if capture and i >= 3:
                    if graph is None:
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            opt.step()
                    graph.replay()
                    continue
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    opt.step()
                torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            runs.append((torch.cat([p.detach().reshape(-1) for p in params]), opt.state_dict()["param_groups"][0]))
    except Exception as exc:
        return dict(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    err = float((runs[0][0] - runs[1][0]).abs().max())
    steps_seen = [r[1]["step"] for r in runs]
    return dict(ok=steps_seen == [steps, steps] and err <= 1e-5, max_abs_err=err, steps=steps_seen)


def optax_rows(sec: Section) -> None:
    """The optax scripts' output, where JAX sees a GPU."""
    try:
        import jax
    except ImportError:
        sec.report.add("optax", "JAX is not installed: optax not measured")
        return
    if jax.devices()[0].platform != "gpu":
        sec.report.add("optax", f"JAX runs on {jax.devices()[0].platform}, not a GPU: optax not measured")
        return
    for script in ("optax_step_time.py", "optax_fusion_floor.py"):
        left = sec.end - time.perf_counter()
        if not sec.open(script) or left < 5:
            continue
        try:
            proc = subprocess.run([sys.executable, str(HERE / script)], capture_output=True, text=True, timeout=left)
            text = f"$ python benchmarks/{script}\n{proc.stdout}{proc.stderr[-2000:]}"
        except subprocess.TimeoutExpired:
            text = f"$ python benchmarks/{script}: stopped at the section's time limit"
        sec.report.add("optax", text)
        print(text)


if __name__ == "__main__":
    sys.exit(main())
