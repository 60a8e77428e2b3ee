"""Train a small Flax MLP on MNIST-1D with ``neumann_optax`` and evaluate it at the evaluation
weights ``w - mu m``.

    pip install ./neumann-optax[example]     # jax, optax, flax, mnist1d (no torch)
    python examples/optax_mnist1d.py [--epochs 40] [--lr 0.3]

MNIST-1D is generated locally (``mnist1d.data.make_dataset``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import neumann_optax
import numpy as np
import optax
from mnist1d.data import get_dataset_args, make_dataset


class MLP(nn.Module):
    width: int = 256

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.3)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--samples", type=int, default=5000, help="MNIST-1D samples (80%% train)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    dargs = get_dataset_args()
    dargs.num_samples = args.samples
    data = make_dataset(dargs)  # generated locally, never downloaded
    x, y = np.asarray(data["x"], np.float32), np.asarray(data["y"])
    xt, yt = jnp.asarray(data["x_test"], jnp.float32), jnp.asarray(data["y_test"])
    steps_per_epoch = len(x) // args.batch

    model = MLP()
    params = model.init(jax.random.PRNGKey(args.seed), jnp.zeros((1, x.shape[1])))
    schedule = optax.cosine_decay_schedule(args.lr, args.epochs * steps_per_epoch)
    tx = neumann_optax.neumann(schedule, steps_per_epoch=steps_per_epoch)  # the paper's defaults
    state = tx.init(params)

    def loss_fn(params, xb, yb):
        logits = model.apply(params, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def train_step(params, state, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    @jax.jit
    def accuracy(params, state):
        eval_params = neumann_optax.evaluation_params(params, state)  # w - mu m
        return (model.apply(eval_params, xt).argmax(-1) == yt).mean()

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        perm = rng.permutation(len(x))
        for k in range(steps_per_epoch):
            idx = perm[k * args.batch : (k + 1) * args.batch]
            params, state, loss = train_step(params, state, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
        if epoch % 10 == 0 or epoch == args.epochs:
            print(f"epoch {epoch:3d}  loss {float(loss):.3f}  test accuracy {float(accuracy(params, state)):.3f}")
    acc = float(accuracy(params, state))
    print(f"test accuracy at the evaluation weights: {acc:.3f} ({time.perf_counter() - t0:.0f} s)")
    return acc


if __name__ == "__main__":
    main()
