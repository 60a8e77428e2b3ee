"""Figures: one colour and marker per optimizer in every figure, matplotlib without a display,
whole-epoch and batch-size axes, and how a figure is saved (with the quick-run warning in its title)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# the palette, defined once: an optimizer (a row of optimizers.LABELS) has this colour in every figure
COLORS = {
    "neumann-default": "tab:blue",
    "neumann": "tab:orange",
    "neumann-lr": "tab:olive",
    "neumann-adaptive": "tab:cyan",
    "sgd": "tab:green",
    "adam": "tab:red",
    "adamw": "tab:purple",
    "rmsprop": "tab:brown",
    "rmsprop-inception": "tab:gray",
    "lars": "tab:pink",
    "lamb": "black",
}
MARKERS = {"neumann-default": "o", "neumann": "s", "sgd": "^", "adamw": "D", "lars": "v", "lamb": "x", "adam": "<"}
BAND = "gold"  # shaded ranges (never an optimizer's colour)
QUICK_NOTE = "quick smoke run: not the documented result"
_quick = False


def style(name: str) -> dict[str, Any]:
    """Colour, marker and line style of optimizer ``name`` (Neumann's rows solid, baselines dashed)."""
    return dict(color=COLORS.get(name), marker=MARKERS.get(name, "o"), ls="-" if name.startswith("neumann") else "--")


@contextmanager
def quick_run(quick: bool) -> Iterator[None]:
    """Inside: every saved figure says in its title that it comes from a quick smoke run."""
    global _quick
    before, _quick = _quick, quick
    try:
        yield
    finally:
        _quick = before


def batch_axis(ax: Any, batches: list[int]) -> None:
    """A log batch-size axis labelled at the batch sizes alone (no minor labels such as 3x10^1)."""
    from matplotlib.ticker import NullFormatter

    ax.set_xticks(batches, [str(b) for b in batches])
    ax.xaxis.set_minor_formatter(NullFormatter())


def steps_axes(ax: Any, batches: list[int], target: float, title: str) -> None:
    """Log-log axes of steps to ``target``% validation error against batch size."""
    ax.set(
        xscale="log", yscale="log", xlabel="batch size", ylabel=f"steps to {target:g}% validation error", title=title
    )
    batch_axis(ax, batches)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def epoch_axis(ax: Any) -> None:
    """Whole-epoch ticks on an epoch axis (never 2.5)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def save_figure(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if _quick:
        fig.suptitle(QUICK_NOTE, color="tab:red", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
