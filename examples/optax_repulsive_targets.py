"""Where neumann_optax ends on optax's four contrib test problems after 30,000 steps, at the
evaluation weights: with the default (no repulsive term) and with the paper's
``repulsive_weight=1e-5``, whose force beta/||w - v||^2 grows as w meets v. Learning rate 1e-3,
``steps_per_epoch=100`` (the setting of neumann-optax/tests/test_optax_conventions.py).

    python examples/optax_repulsive_targets.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import neumann_optax
import optax

STEPS = 30_000


def targets() -> dict:
    f1, f2 = jnp.array([1.0, -1.0, 2.0]), jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    par, mat = jnp.array([1.0, -1.0, 1.0]), jnp.array([[3.0, -2.0], [1.0, 4.0]])
    return {
        "parabola": (jnp.array([-1.0, 10.0, 1.0]), par, lambda p: jnp.sum((p - par) ** 2)),
        "rosenbrock": (jnp.zeros(2), jnp.ones(2), lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2),
        "matrix": (jnp.zeros((2, 2)), mat, lambda p: jnp.sum((p - mat) ** 2)),
        "mixed tree": (
            (jnp.zeros(3), jnp.zeros((2, 2))),
            (f1, f2),
            lambda p: jnp.sum((p[0] - f1) ** 2) + jnp.sum((p[1] - f2) ** 2),
        ),
    }


def distance(tx: optax.GradientTransformation, start, final, loss) -> float:
    @jax.jit
    def train(params):
        def body(carry, _):
            p, s = carry
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, u), s), None

        (params, state), _ = jax.lax.scan(body, (params, tx.init(params)), length=STEPS)
        return neumann_optax.evaluation_params(params, state)

    ev = train(start)
    return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ev), jax.tree.leaves(final), strict=True))


def main() -> None:
    print(f"max |evaluation weights - optimum| after {STEPS:,} steps (lr 1e-3, steps_per_epoch=100)")
    print("| problem | default (no repulsive term) | repulsive_weight=1e-5 (paper) |")
    print("|---|---|---|")
    for name, (start, final, loss) in targets().items():
        d = [
            distance(neumann_optax.neumann(1e-3, steps_per_epoch=100, repulsive_weight=rw), start, final, loss)
            for rw in (0.0, 1e-5)
        ]
        print(f"| {name} | {d[0]:.1e} | {d[1]:.3f} |")


if __name__ == "__main__":
    main()
