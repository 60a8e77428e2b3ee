"""Watch Neumann train in TensorBoard: the README's quick-start loop with one extra line,
``log_step_records(opt, writer, every_n_steps=...)``, run with the default (no repulsive term) and
with the paper's ``repulsive_weight=1e-5``. Then the curves are read back from the TensorBoard
event files and drawn into one PNG.

    python examples/watch_training.py [--epochs 40] [--out runs/watch] [--png runs/watch/neumann-curves.png]
    tensorboard --logdir runs/watch      # the same curves, live

What to look for: the phase (burn-in, then Neumann with a reset at each step of the doubling
schedule), mu climbing from 0.5 to 0.9, ||w - v||, and the repulsive force beta/||w - v||^2 against
the gradient norm: with the paper's weight it outgrows the gradient as the learning rate decays.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from mnist1d.data import get_dataset_args, make_dataset
from torch.utils.tensorboard import SummaryWriter

from neumann_optimizer import Neumann
from neumann_optimizer.monitoring import log_step_records

RUNS = {"default (no repulsive term)": dict(), "paper's repulsive_weight=1e-5": dict(repulsive_weight=1e-5)}
PANELS = [
    ("neumann/momentum", "momentum mu used", "linear"),
    ("neumann/distance", "||w - v||", "log"),
    ("neumann/repulsive_to_grad", "repulsive force / ||g||", "log"),
    ("neumann/cubic_to_grad", "cubic force / ||g||", "log"),
    ("neumann/lr", "learning rate", "linear"),
    ("test_accuracy", "test accuracy (evaluation weights)", "linear"),
]


def train(name: str, extra: dict, epochs: int, logdir: Path, data: dict) -> None:
    torch.manual_seed(0)
    x, y = torch.tensor(data["x"], dtype=torch.float32), torch.tensor(data["y"])
    xt, yt = torch.tensor(data["x_test"], dtype=torch.float32), torch.tensor(data["y_test"])
    model = torch.nn.Sequential(torch.nn.Linear(40, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    loader = torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=100, shuffle=True)
    opt = Neumann(model.parameters(), lr=0.2, steps_per_epoch=len(loader), **extra)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    writer = SummaryWriter(logdir)
    log = log_step_records(opt, writer, every_n_steps=10)  # the one extra line
    for epoch in range(1, epochs + 1):
        for xb, yb in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            sched.step()
        with opt.evaluation(), torch.no_grad():
            acc = float((model(xt).argmax(1) == yt).float().mean())
        writer.add_scalar("test_accuracy", acc, epoch * len(loader))
    log.remove()
    writer.close()
    print(f"{name}: final test accuracy {acc:.3f}; TensorBoard logs in {logdir}")


def plot(out: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), sharex=True)
    for (name, _), color in zip(RUNS.items(), ("tab:blue", "tab:orange"), strict=True):
        acc = EventAccumulator(str(out / _slug(name)))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        phase = [(e.step, e.value) for e in acc.Scalars("neumann/phase")]
        for ax, (tag, title, scale) in zip(axes.flat, PANELS, strict=True):
            pts = [e for e in acc.Scalars(tag) if scale == "linear" or e.value > 0] if tag in tags else []
            if pts:  # (the default's repulsive force is 0: nothing to draw on a log axis)
                ax.plot([e.step for e in pts], [e.value for e in pts], color=color, lw=1.2, label=name)
            ax.set(title=title, yscale=scale)
        for ax in axes.flat:  # shade the burn-in (phase 0)
            burn = [s for s, v in phase if v == 0]
            if burn:
                ax.axvspan(0, max(burn), color="0.9", zorder=0)
    axes[0][2].axhline(1.0, color="gray", ls=":", lw=1)
    axes[0][2].text(0.02, 0.9, "above 1: outweighs the gradient", transform=axes[0][2].transAxes, fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend([*handles, Patch(color="0.9")], [*labels, "burn-in (plain SGD)"], loc="lower center", ncol=3)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle("Neumann on MNIST-1D (MLP, batch 100, cosine decay), logged with log_step_records")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    print(f"curves drawn to {png}")


def _slug(name: str) -> str:
    return "default" if name.startswith("default") else "paper"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--epochs", type=int, default=40, help="epochs of each run (default: 40)")
    ap.add_argument("--out", type=Path, default=Path("runs/watch"), help="TensorBoard logs (default: runs/watch)")
    ap.add_argument("--png", type=Path, default=None, help="the picture (default: OUT/neumann-curves.png)")
    args = ap.parse_args()
    data = make_dataset(get_dataset_args())  # generated locally, nothing is downloaded
    for name, extra in RUNS.items():
        train(name, extra, args.epochs, args.out / _slug(name), data)
    plot(args.out, args.png or args.out / "neumann-curves.png")


if __name__ == "__main__":
    main()
