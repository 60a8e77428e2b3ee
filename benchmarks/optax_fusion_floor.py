"""How close to Adam's step can a Neumann step get under this XLA backend? Side by side in one
process, on one float32 array of ``--params`` million elements (buffers donated, as a training step
donates them), medians of interleaved rounds:

- ``adam``: Adam's elementwise step (m, nu, w), the target;
- ``neumann, no norm``: Neumann's elementwise step with a fixed regularizer coefficient, so no
  reduction at all: the floor of any Neumann step under this backend;
- ``neumann, carried norm``: the same plus the sum of ||w' - v'||^2 over the arrays it wrote,
  the one-pass design (the next step's norm summed after the update, as the PyTorch CPU kernel does);
- ``neumann, two passes``: the norm of w - v first, then the update that needs it (the design
  ``neumann_optax`` uses).

It also prints how many loops (fusions) XLA emitted for each and how many arrays those loops read
and write: XLA:CPU emits one loop per output array, each reading every input its output depends on.

With ``--multi-output-fusion`` it turns on XLA:CPU's optional multi-output fusion pass
(``XLA_FLAGS=--xla_backend_extra_options=xla_cpu_use_multi_output_fusion``, off by default) to
show what it does to each step.

    python benchmarks/optax_fusion_floor.py [--params 10] [--rounds 9] [--multi-output-fusion]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp


def adam(g, w, m, v):
    m2 = 0.9 * m + 0.1 * g
    v2 = 0.999 * v + 0.001 * g * g
    return w - 1e-3 * m2 / (jnp.sqrt(v2) + 1e-8), m2, v2


def _neumann(g, w, m, v, c):
    d = g + c * (w - v)
    m2 = 0.9 * m - 0.1 * d
    w2 = w + 0.9 * m2 - 0.1 * d
    return w2, m2, v + 0.01 * (w2 - v)


def neumann_no_norm(g, w, m, v):
    return _neumann(g, w, m, v, 1e-7)


def neumann_carried(g, w, m, v):
    w2, m2, v2 = _neumann(g, w, m, v, 1e-7)
    w2, v2 = jax.lax.optimization_barrier((w2, v2))  # sum over the written arrays, not fused back
    return w2, m2, v2, jnp.sum(jnp.square(w2 - v2))


def neumann_two_pass(g, w, m, v):
    c = 1e-7 * jnp.sqrt(jnp.sum(jnp.square(w - v)))
    c, g, m, v = jax.lax.optimization_barrier((c, g, m, v))
    return _neumann(g, w, m, v, c)


STEPS = {
    "adam": adam,
    "neumann, no norm": neumann_no_norm,
    "neumann, carried norm": neumann_carried,
    "neumann, two passes": neumann_two_pass,
}


def _loops(hlo: str) -> tuple[int, int]:
    """(loops, arrays they touch): the fusions of the entry computation, and their non-constant
    operands plus their array-shaped (not scalar) outputs."""
    entry = hlo[hlo.index("ENTRY") :]
    loops = touched = 0
    for m in re.finditer(r"= (\(.*?\)|\S+) fusion\((.*?)\)", entry):
        out_type, operands = m.groups()
        loops += 1
        touched += len(re.findall(r"f32\[\d", out_type))
        touched += sum(1 for op in re.findall(r"%[\w.\-]+", operands) if not op.startswith("%constant"))
    return loops, touched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=10.0, help="millions of elements")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument(
        "--multi-output-fusion", action="store_true", help="turn on XLA:CPU's optional multi-output fusion pass"
    )
    args = ap.parse_args()
    if args.multi_output_fusion:  # read when the backend starts, at the first array below
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_extra_options=xla_cpu_use_multi_output_fusion".strip()
    n = int(args.params * 1e6) // 512 * 512
    key = jax.random.PRNGKey(0)
    live = {}
    for name, f in STEPS.items():
        w = jax.random.normal(key, (n // 512, 512))
        arrays = [w * 1e-3, w, w * 0.1, w * 0.99]
        step = jax.jit(f, donate_argnums=(1, 2, 3))
        hlo = step.lower(*arrays).compile().as_text()
        out = step(*arrays)
        arrays[1:4] = out[:3]
        jax.block_until_ready(arrays)
        live[name] = (step, arrays, _loops(hlo))
    times: dict[str, list[float]] = {name: [] for name in STEPS}
    for _ in range(args.rounds):
        for name, (step, arrays, _) in live.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                out = step(*arrays)
                arrays[1:4] = out[:3]
            jax.block_until_ready(arrays)
            times[name].append((time.perf_counter() - t0) / args.steps)
    dev = jax.devices()[0]
    print(
        f"# {n / 1e6:.1f}M float32 elements, one array; jax {jax.__version__}; {dev.platform} ({dev.device_kind}); "
        f"median of {args.rounds} interleaved rounds of {args.steps} steps"
        + ("; XLA:CPU multi-output fusion on" if args.multi_output_fusion else "")
    )
    base = statistics.median(times["adam"])
    print("| step | ms | vs adam | XLA loops | loop operands + outputs |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        loops, touched = live[name][2]
        print(f"| {name} | {1e3 * med:.2f} | {med / base:.2f}x | {loops} | {touched} |")


if __name__ == "__main__":
    main()
