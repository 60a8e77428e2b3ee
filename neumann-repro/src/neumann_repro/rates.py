"""Rate advice from every committed run: for the default Neumann optimizer on the MLP, per batch size,
the largest learning rate at which no run of 20 epochs or more failed (diverged, or ended at 80%
validation error or worse: a collapse to chance, which is 90%), nor any run at a smaller rate."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

MIN_EPOCHS = 20
FAILED_AT = 80.0  # % validation error at the end: a run that collapsed (chance is 90%)
MIN_BATCH_RUNS = 5  # batches with fewer runs are left out


def _is_default_mlp(cfg: dict[str, Any]) -> bool:
    return (
        cfg.get("optimizer") == "neumann"
        and cfg.get("model") == "mlp"
        # a config without repulsive_weight is the paper's Table 1, 1e-5 (train.PAPER_REPULSIVE_WEIGHT)
        and cfg.get("repulsive_weight") == 0.0
        and cfg.get("regularizer_schedule", "constant") == "constant"
        and cfg.get("cubic_weight", 1e-7) == 1e-7
        and cfg.get("burn_in_epochs", 5) == 5
        and cfg.get("momentum") is None  # a constant mu instead of the ramp (ingredients)
        and cfg.get("resets", True)
    )


def failed(run: dict[str, Any]) -> bool:
    hist = run.get("history") or []
    final = hist[-1]["val_error"] if hist else math.nan
    return bool(run.get("diverged")) or math.isnan(final) or final >= FAILED_AT


def tally(payloads: list[dict[str, Any]]) -> dict[int, dict[float, tuple[int, int]]]:
    """batch -> lr -> (runs, failed runs), over the default Neumann MLP runs of every payload."""
    counts: dict[int, dict[float, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for payload in payloads:
        for run in payload.get("runs", []):
            cfg = run.get("config", {})
            per_epoch = run.get("steps_per_epoch") or 0
            if not _is_default_mlp(cfg) or not per_epoch:
                continue
            # the run's planned length (a diverged run stops early and still counts)
            if (cfg.get("epochs") or (cfg.get("steps") or run["steps"]) / per_epoch) < MIN_EPOCHS:
                continue
            cell = counts[cfg["batch"]][cfg["lr"]]
            cell[0] += 1
            cell[1] += failed(run)
    return {b: {lr: (n, k) for lr, (n, k) in sorted(per.items())} for b, per in sorted(counts.items())}


def rate_table(payloads: list[dict[str, Any]]) -> str:
    """The markdown table of the module doc, one row per batch size."""
    lines = [
        "| batch | largest safe rate | runs there | next rate up: failed / runs |",
        "|---|---|---|---|",
    ]
    for batch, per in tally(payloads).items():
        if sum(n for n, _ in per.values()) < MIN_BATCH_RUNS:
            continue
        safe = None
        for lr, (n, k) in per.items():
            if k:
                nxt = f"{lr:g}: {k} / {n}"
                break
            safe = lr
        else:
            nxt = "none tried"
        shown, runs = (f"{safe:g}", per[safe][0]) if safe is not None else ("—", 0)
        lines.append(f"| {batch:,} | {shown} | {runs} | {nxt} |")
    return "\n".join(lines)


SECTION = (
    "## Learning rates by batch size (every study's runs)\n\n"
    "For the default Neumann optimizer on the MLP, over every committed run of "
    f"{MIN_EPOCHS} epochs or more: the largest rate at which no run, and no run at a smaller rate, failed "
    f"(diverged, or ended at {FAILED_AT:g}% validation error or worse: a collapse to chance, 90%), and what "
    "the next rate up did. Runs of every study count, tuning seeds and all schedules included; a rate with "
    "few runs there is weak evidence that it is safe.\n"
)
