"""Peak memory of switching to the evaluation weights: ``evaluation="exact"`` vs ``"in_place"``.

    python benchmarks/eval_memory.py                 # 50M float32 parameters on CPU
    python benchmarks/eval_memory.py --millions 10

Each mode runs in a fresh subprocess: a transformer-like set of parameters (as in
``step_time.py``), a few Neumann steps (so ``m`` is non-zero), then ``opt.eval()`` and
``opt.train()``. Around each switch the kernel's resident-set high-water mark is reset
(``/proc/self/clear_refs``, Linux) and read back (``VmHWM``), so the figure is the extra peak
memory of the switch itself. Also printed: time per switch and how far ``train()`` puts the
weights from where they were (0 for exact mode). This is a benchmark, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def child(mode: str, millions: float) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from step_time import transformer_like

    from neumann_optimizer import Neumann

    params = transformer_like(int(millions * 1e6))
    n = sum(p.numel() for p in params)
    opt = Neumann(params, lr=1e-3, burn_in_steps=0, reset_steps=100, momentum_ramp_steps=1.0, evaluation=mode)
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    for _ in range(3):
        opt.step()
    before = [p.detach().clone() for p in params[:4]]  # a sample to measure the restore error
    out: dict = dict(mode=mode, params=n, param_bytes=4 * n)
    for name, fn in (("eval", opt.eval), ("train", opt.train)):
        base = _status("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        fn()
        out[f"{name}_s"] = time.perf_counter() - t0
        out[f"{name}_extra_peak"] = _status("VmHWM") - base
        out[f"{name}_extra_after"] = _status("VmRSS") - base
    out["restore_max_abs_error"] = max(float((p - b).abs().max()) for p, b in zip(params, before, strict=False))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--millions", type=float, default=50.0)
    ap.add_argument("--child", choices=["exact", "in_place"])
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.millions)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from _children import in_children

    rows = in_children(__file__, ("exact", "in_place"), args.millions)
    mb = 2**20
    print(f"{rows[0]['params'] / 1e6:.1f}M float32 parameters ({rows[0]['param_bytes'] / mb:.0f} MiB), CPU, torch")
    print("| evaluation= | extra peak during eval() | held in eval mode | eval() | train() | train() restores w to |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']!r} | {r['eval_extra_peak'] / mb:.0f} MiB ({r['eval_extra_peak'] / r['param_bytes']:.2f}x "
            f"params) | {r['eval_extra_after'] / mb:.0f} MiB | {1e3 * r['eval_s']:.0f} ms "
            f"| {1e3 * r['train_s']:.0f} ms | max abs error {r['restore_max_abs_error']:.1e} |"
        )


if __name__ == "__main__":
    main()
