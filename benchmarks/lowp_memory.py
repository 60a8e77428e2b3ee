"""Peak memory of one step with bfloat16 parameters on the multi-tensor path, per parameter.

    python benchmarks/lowp_memory.py                 # 50M bfloat16 parameters on CPU
    python benchmarks/lowp_memory.py --millions 10

bfloat16/float16 parameters are updated in float32 and rounded once. The update used to make float32
copies of the whole parameter list (w, g, m, v) at once; it now makes them a chunk of tensors at a
time (``functional.UPCAST_CHUNK`` elements). Each variant runs in a fresh subprocess: a
transformer-like set of bfloat16 parameters (as in ``step_time.py``), ``Neumann(foreach=True)`` past
its first steps, then one regular step with the kernel's resident-set high-water mark reset before
it (``/proc/self/clear_refs``, Linux; after ``malloc_trim`` gave back what earlier steps freed) and
read after it (``VmHWM``): the step's extra peak memory.
"whole list" sets the chunk to the whole list, as before. Also printed: the state's bytes per
parameter (``m`` in bfloat16, ``v`` in float32). A benchmark, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def child(variant: str, millions: float) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from step_time import transformer_like

    from neumann_optimizer import Neumann
    from neumann_optimizer import functional as F

    if variant == "whole list":
        F.UPCAST_CHUNK = 2**62
    params = [torch.nn.Parameter(p.detach().bfloat16()) for p in transformer_like(int(millions * 1e6))]
    for p in params:
        p.grad = (torch.randn(p.shape) * 1e-3).bfloat16()
    n = sum(p.numel() for p in params)
    opt = Neumann(params, lr=1e-3, burn_in_steps=0, reset_steps=10**6, momentum_ramp_steps=1.0, foreach=True)
    for _ in range(3):  # the reset, then regular steps (the most expensive phase)
        opt.step()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what earlier steps freed: the base is what is held
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    opt.step()
    peak = _status("VmHWM") - base
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    return dict(variant=variant, params=n, extra_peak_per_param=peak / n, state_per_param=state / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--millions", type=float, default=50.0, help="millions of parameters (default: 50)")
    ap.add_argument("--child", choices=["whole list", "chunked"])
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.millions)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from _children import in_children

    rows = in_children(__file__, ("whole list", "chunked"), args.millions)
    print(f"{rows[0]['params'] / 1e6:.1f}M bfloat16 parameters, Neumann(foreach=True), one regular step, CPU")
    print("| float32 copies | extra peak memory of the step (bytes/param) | state (bytes/param) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['extra_peak_per_param']:.1f} | {r['state_per_param']:.1f} |")


if __name__ == "__main__":
    main()
