"""Step time of ``neumann_optax.neumann`` against ``optax.adam`` on the same pytree, side by side.

A transformer-like pytree (embedding, attention and MLP kernels, biases, layer norms; about 10M
float32 parameters by default), one jitted ``update`` + ``apply_updates`` per step with the
parameters and state donated (updated in place, as a training step would), the two optimizers
timed in interleaved rounds; medians and their ratio are printed. Both read the gradient and
read and write the parameters and two buffers per parameter, so the target ratio is about 1.

    python benchmarks/optax_step_time.py [--params 10] [--rounds 15] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import neumann_optax
import optax


def transformer_like(million: float, d: int = 512, vocab: int = 1024, seed: int = 0) -> dict:
    """Layers of d x 3d, d x d, d x 4d, 4d x d kernels with biases and layer norms, plus an
    embedding, as many layers as reach ``million`` parameters."""
    per_layer = d * 3 * d + d * d + 2 * d * 4 * d + 3 * d + d + 4 * d + d + 4 * d
    layers = max(1, round((million * 1e6 - vocab * d) / per_layer))
    key = jax.random.PRNGKey(seed)
    tree: dict = {"embed": jax.random.normal(key, (vocab, d)) * 0.02}
    for i in range(layers):
        key, *ks = jax.random.split(key, 5)
        tree[f"layer{i}"] = {
            "qkv": {"kernel": jax.random.normal(ks[0], (d, 3 * d)) * 0.02, "bias": jnp.zeros(3 * d)},
            "out": {"kernel": jax.random.normal(ks[1], (d, d)) * 0.02, "bias": jnp.zeros(d)},
            "up": {"kernel": jax.random.normal(ks[2], (d, 4 * d)) * 0.02, "bias": jnp.zeros(4 * d)},
            "down": {"kernel": jax.random.normal(ks[3], (4 * d, d)) * 0.02, "bias": jnp.zeros(d)},
            "ln": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
        }
    return tree


def make_step(tx: optax.GradientTransformation):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=10.0, help="millions of parameters")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round")
    args = ap.parse_args()
    params0 = transformer_like(args.params)
    n = sum(x.size for x in jax.tree.leaves(params0))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params0)
    # past the burn-in, so the timed steps are regularized Neumann steps (the norm and all)
    contenders = {
        "optax.adam": optax.adam(1e-3),
        "neumann_optax": neumann_optax.neumann(1e-3, burn_in_steps=1, reset_steps=10**6, momentum_ramp_steps=1),
    }
    live = {}
    for name, tx in contenders.items():
        p = jax.tree.map(jnp.copy, params0)
        st = tx.init(p)
        step = make_step(tx)
        for _ in range(3):  # compile, leave the burn-in and the first reset
            p, st = step(p, st, grads)
        jax.block_until_ready(p)
        live[name] = [step, p, st]
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name in contenders:
            step, p, st = live[name]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                p, st = step(p, st, grads)
            jax.block_until_ready(p)
            times[name].append((time.perf_counter() - t0) / args.steps)
            live[name][1:] = [p, st]
    dev = jax.devices()[0]
    print(
        f"# {n / 1e6:.1f}M float32 parameters in {len(jax.tree.leaves(params0))} arrays; jax {jax.__version__}, "
        f"optax {optax.__version__}; {dev.platform} ({dev.device_kind}), {os.cpu_count()} cores, "
        f"{platform.machine()}; median of {args.rounds} interleaved rounds of {args.steps} steps"
    )
    adam = statistics.median(times["optax.adam"])
    print("| optimizer | ms per step | vs optax.adam |")
    print("|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {1e3 * med:.2f} | {med / adam:.2f}x |")


if __name__ == "__main__":
    main()
