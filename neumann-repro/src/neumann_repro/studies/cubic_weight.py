"""``neumann-repro cubic-weight``: does the paper's cubic regularizer do anything at any strength?

The cubic term ``alpha/3 ||w - v||^3`` adds ``alpha ||w - v||`` of curvature along ``w - v``: the
paper's convexifying mechanism (Section 3.2). Every committed run before this study used alpha = 1e-7
or 0, where its force ``alpha r^2`` is a few millionths of the gradient. This study sweeps alpha over
seven decades with beta = 0 (the library's default), at batches 256 and 1,024 over a fixed 50 epochs,
every alpha tuned on its own, and decides the default by a rule stated before the runs
(:data:`RULE`).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from ..plotting import pyplot, save_figure
from ..runner import Runner
from ..study import Payload, Rendered, Settings, Study, base_cfg, cells_of, finish
from ..tables import fmt, plural
from ..tuning import FULL_PROTOCOL, Protocol, choose, lr_at, lr_index, reported, summarize, tune
from ..verdicts import ERROR_MARGIN, ERROR_RULE, error_contrast, said_error, settle

ALPHAS = (0.0, 1e-7, 1e-5, 1e-3, 1e-2, 1e-1, 1.0)
DEFAULT_ALPHA = 1e-7  # the library's cubic_weight today (the paper's Table 1)
QUICK_ALPHAS = (0.0, 1e-7, 1e-1)
TARGETS = (8.0, 6.0, 5.0)  # % validation error: epochs to each
REPORT_SEEDS = 8  # reporting seeds per cell (2..9), disjoint from the 2 tuning seeds
MAX_PROBES = 4  # rates above the tuned grid tried for the largest stable rate

RULE = (
    "The default, by a rule set before the runs (docs/SPEC.md section 7): each alpha's final test error is "
    "compared with alpha = 1e-7's (today's default) at each batch, on the reporting seeds, one Holm family over "
    "all alphas and batches, equivalence margin ±0.3 points. (1) If some alpha > 0 other than 1e-7 is better "
    "(Holm-adjusted p < 0.05) at some batch and worse at none, it becomes the default (several: the lowest mean "
    "final error over both batches). (2) Otherwise, if alpha = 0 is equivalent to 1e-7 (90% interval inside "
    "±0.3 points) at every batch, alpha = 0 becomes the default: the lean step, strictly cheaper in memory (no v) "
    "and time per step. (3) Otherwise the default stays 1e-7."
)


def settings(s: Settings) -> dict[str, Any]:
    if s.quick:
        cfg = base_cfg(task=s.task4k, model="mlp", epochs=s.budget(6, 6), burn_in_epochs=1)
        return dict(alphas=QUICK_ALPHAS, batches=(128,), base=cfg, report=1)
    cfg = base_cfg(task=s.task_large, model="mlp", epochs=s.budget(50, 50))
    return dict(alphas=ALPHAS, batches=(256, 1024), base=cfg, report=s.n_seeds(REPORT_SEEDS, REPORT_SEEDS))


def cubic_weight(runner: Runner, s: Settings) -> str:
    st = settings(s)
    protocol = (
        Protocol(points=3, tune_seeds=1, final_seeds=1 + st["report"], max_extensions=1, grid="fine", score="worse")
        if s.quick
        else Protocol(**FULL_PROTOCOL, final_seeds=2 + st["report"])
    )
    cells = {
        f"{b}/{a:g}": (
            {
                **st["base"],
                "batch": b,
                "optimizer": "neumann",
                "cubic_weight": a,
                "repulsive_weight": 0.0,
                "track_regularizer": True,
            },
            math.sqrt(b / 256),
        )
        for b in st["batches"]
        for a in st["alphas"]
    }
    runs = tune(runner, cells, protocol, "cubic-weight")
    runs = probe_stability(runner, cells, runs, protocol, MAX_PROBES if not s.quick else 1)
    payload = dict(
        study="cubic-weight",
        meta=dict(
            alphas=list(st["alphas"]),
            batches=list(st["batches"]),
            base=dict(st["base"]),
            protocol=protocol.as_dict(),
            targets=list(TARGETS if not s.quick else (60.0, 50.0)),
            rule=RULE,
        ),
        runs=[r for cell in runs.values() for r in cell],
    )
    return finish(runner, s, payload, render_cubic_weight)


def probe_stability(
    runner: Runner,
    cells: dict[str, tuple[dict[str, Any], float]],
    runs: dict[str, list[dict[str, Any]]],
    protocol: Protocol,
    max_probes: int,
) -> dict[str, list[dict[str, Any]]]:
    """Rates above the highest tried (tuning seeds) until one diverges on a tuning seed, at most
    ``max_probes`` per cell: the largest stable rate is then bracketed (a diverged run stops at once).
    A probe is one more rate of the grid: where one scores better than the grid's choice, it is the
    choice, and its reporting seeds run."""
    for _ in range(max_probes):
        plan = []
        for name, (cfg, _) in cells.items():
            if largest_stable(runs[name], protocol.tune_seeds)[1]:
                continue
            top = max(float(r["config"]["lr"]) for r in runs[name])
            lr = lr_at(lr_index(top, protocol.grid) + 1, protocol.grid)
            plan += [(name, {**cfg, "lr": lr, "seed": k}) for k in range(protocol.tune_seeds)]
        if not plan:
            break
        for (name, _), res in zip(plan, runner.run_all([c for _, c in plan], "cubic-weight: stability"), strict=True):
            runs[name].append({"cell": name, **res})
    plan = []
    for name, (cfg, _) in cells.items():
        lr = choose(runs[name], protocol.tune_seeds, protocol.score).lr
        have = {r["config"]["seed"] for r in runs[name] if r["config"]["lr"] == lr}
        plan += [(name, {**cfg, "lr": lr, "seed": k}) for k in range(protocol.final_seeds) if k not in have]
    for (name, _), res in zip(plan, runner.run_all([c for _, c in plan], "cubic-weight: seeds"), strict=True):
        runs[name].append({"cell": name, **res})
    return runs


def largest_stable(runs: list[dict[str, Any]], tune_seeds: int) -> tuple[float | None, bool]:
    """The largest rate tried below every rate at which a tuning seed diverged, and whether a
    divergence above it was seen (the bracket closed)."""
    per: dict[float, bool] = {}
    for r in runs:
        if r["config"]["seed"] < tune_seeds:
            lr = float(r["config"]["lr"])
            per[lr] = per.get(lr, False) or bool(r["diverged"])
    bad = [lr for lr, d in per.items() if d]
    first_bad = min(bad) if bad else math.inf
    ok = [lr for lr in per if lr < first_bad]
    return (max(ok) if ok else None), bool(bad)


def epochs_to(run: dict[str, Any], target: float) -> int | None:
    """The first epoch whose validation error is at or below ``target`` (``None``: never)."""
    for h in run["history"]:
        if h["val_error"] <= target:
            return int(h["epoch"])
    return None


def cell_row(runs: list[dict[str, Any]], protocol: Protocol, targets: list[float]) -> dict[str, Any]:
    """One (batch, alpha): the tuned choice (among every rate its tuning seeds ran, the stability probes
    included), the reporting seeds' test errors, divergences, cubic share, epochs to each target, and
    the largest stable rate."""
    row = summarize(runs, protocol.tune_seeds, protocol.final_seeds, protocol.score)
    at = reported(runs, protocol.tune_seeds, protocol.final_seeds, row["lr"])
    shares = [r["cubic_share_median"] for r in at if r.get("cubic_share_median") is not None]
    hits = {t: [epochs_to(r, t) for r in at] for t in targets}
    stable, closed = largest_stable(runs, protocol.tune_seeds)
    row.update(
        report_diverged=sum(bool(r["diverged"]) for r in at),
        cubic_share=statistics.median(shares) if shares else None,
        epochs_to={
            str(t): dict(
                median=_median_hit(h),
                reached=sum(e is not None for e in h),
                of=len(h),
            )
            for t, h in hits.items()
        },
        largest_stable=stable,
        stable_bracketed=closed,
    )
    return row


def _median_hit(h: list[int | None]) -> float | None:
    """The median epoch to the target over the seeds, a miss counting as later than any epoch;
    ``None`` where half the seeds or more missed."""
    if not h:
        return None
    m = statistics.median([math.inf if e is None else e for e in h])
    return m if math.isfinite(m) else None


# ---------------------------------------------------------------- rendering
def _rows(payload: Payload) -> dict[int, dict[float, dict[str, Any]]]:
    meta = payload["meta"]
    protocol = Protocol(**meta["protocol"])
    cells = cells_of(payload["runs"])
    out: dict[int, dict[float, dict[str, Any]]] = {}
    for b in meta["batches"]:
        for a in meta["alphas"]:
            if f"{b}/{a:g}" in cells:
                out.setdefault(b, {})[a] = cell_row(cells[f"{b}/{a:g}"], protocol, meta["targets"])
    return out


def contrasts(rows: dict[int, dict[float, dict[str, Any]]]) -> dict[tuple[int, float], dict[str, Any] | None]:
    """Every alpha against ``DEFAULT_ALPHA`` at every batch, final test error on the reporting seeds:
    one Holm family."""
    out = {
        (b, a): error_contrast(row["report"], per[DEFAULT_ALPHA]["report"])
        for b, per in rows.items()
        if DEFAULT_ALPHA in per
        for a, row in per.items()
        if a != DEFAULT_ALPHA
    }
    settle(list(out.values()), ERROR_MARGIN)
    return out


def decide_default(rows: dict[int, dict[float, dict[str, Any]]]) -> tuple[float, str]:
    """:data:`RULE`, applied: (the default alpha, why)."""
    cs = contrasts(rows)
    better: dict[float, list[int]] = {}
    worse: set[float] = set()
    for (b, a), c in cs.items():
        if c is not None and c["decision"] == "differs":
            if c["diff"] < 0:
                better.setdefault(a, []).append(b)
            else:
                worse.add(a)
    gains = [a for a in better if a > 0 and a not in worse]
    if gains:
        best = min(gains, key=lambda a: statistics.fmean(per[a]["test_mean"] for per in rows.values() if a in per))
        where = ", ".join(f"batch {b}" for b in better[best])
        return best, f"alpha = {best:g} is better than 1e-7 at {where} and worse nowhere (rule 1)"
    zero = [cs.get((b, 0.0)) for b in rows]
    if zero and all(c is not None and c["decision"] == "equivalent" for c in zero):
        return 0.0, "alpha = 0 is equivalent to 1e-7 within ±0.3 points at every batch (rule 2)"
    said = "; ".join(f"batch {b}: {said_error(cs.get((b, 0.0)), 'alpha = 0')}" for b in rows)
    why = f"no alpha is better anywhere and alpha = 0 is not shown equivalent everywhere ({said}) (rule 3)"
    return DEFAULT_ALPHA, why


def _hits(row: dict[str, Any], t: float) -> str:
    e = row["epochs_to"][str(t)]
    med = "—" if e["median"] is None else f"{e['median']:.0f}"
    return f"{med} ({e['reached']}/{e['of']})"


def render_cubic_weight(payload: Payload, out_dir: Path) -> Rendered:
    meta = payload["meta"]
    protocol = Protocol(**meta["protocol"])
    rows = _rows(payload)
    cs = contrasts(rows)
    base = meta["base"]
    targets = meta["targets"]
    n_rep = protocol.final_seeds - protocol.tune_seeds
    lines = [
        "# cubic-weight: the cubic regularizer swept (Section 3.2)\n",
        f"MLP on {base['task']}, {base['epochs']} epochs, cosine decay to 0, beta = 0, the default burn-in and ramp. "
        f"Each alpha tuned on its own: the fine grid (4 rates per decade) from 3 rates, extended until the choice is "
        f"inside, {plural(protocol.tune_seeds, 'tuning seed')} scored by the worse; then rates above the highest "
        "tried until one diverges on a tuning seed (at most 4; a probe that scores better becomes the choice). "
        f"{plural(n_rep, 'reporting seed')} ({protocol.tune_seeds}-{protocol.final_seeds - 1}) at the chosen rate.\n",
        "'cubic share': the cubic force alpha r^2 over the mini-batch gradient norm, the median over each reporting "
        "seed's regularized steps, then over the seeds. 'diverged': reporting seeds that diverged at the chosen rate. "
        "'largest stable': the largest rate tried below every rate at which a tuning seed diverged (open: no "
        "divergence was reached). 'epochs to X%': the median over the reporting seeds of the first epoch at or below "
        "X% validation error (how many reached). 'vs 1e-7': the final test error's difference from alpha = 1e-7 "
        f"(positive: worse) on the reporting seeds, one Holm family of {len(cs)} tests. {ERROR_RULE}\n",
    ]
    summary: dict[str, Any] = {"cells": {}, "contrasts": {}}
    for b, per in rows.items():
        lines += [
            f"\n## Batch {b}\n",
            "| alpha | tuned lr | largest stable | diverged | cubic share | final test % | "
            + " | ".join(f"epochs to {t:g}%" for t in targets)
            + " | vs 1e-7 |",
            "|---|---|---|---|---|---|" + "---|" * len(targets) + "---|",
        ]
        for a, row in per.items():
            share = "0 (lean step)" if a == 0 else "—" if row["cubic_share"] is None else f"{row['cubic_share']:.2g}"
            stable = "—" if row["largest_stable"] is None else f"{row['largest_stable']:g}"
            stable += "" if row["stable_bracketed"] else " (open)"
            c = cs.get((b, a))
            vs = "—" if a == DEFAULT_ALPHA else said_error(c, f"alpha {a:g}")
            lines.append(
                f"| {a:g} | {row['lr']:g}{'' if row['interior'] else ' (EDGE)'} | {stable} | "
                f"{row['report_diverged']}/{n_rep} | {share} | {fmt(row['test_mean'], row['test_std'])} | "
                + " | ".join(_hits(row, t) for t in targets)
                + f" | {vs} |"
            )
            summary["cells"][f"{b}/{a:g}"] = {
                k: row[k]
                for k in (
                    "lr",
                    "interior",
                    "test_mean",
                    "test_std",
                    "report",
                    "report_diverged",
                    "cubic_share",
                    "largest_stable",
                    "stable_bracketed",
                    "epochs_to",
                )
            }
            if c is not None:
                summary["contrasts"][f"{b}/{a:g}"] = {k: v for k, v in c.items() if k != "ci90"}
    alpha, why = decide_default(rows) if rows else (DEFAULT_ALPHA, "no results")
    summary["default"], summary["why"] = alpha, why
    lines += ["\n## The default\n", RULE + "\n", f"Applied: **cubic_weight = {alpha:g}**: {why}."]
    _plot(rows, meta, out_dir)
    return "\n".join(lines) + "\n", summary


def _plot(rows: dict[int, dict[float, dict[str, Any]]], meta: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    alphas = meta["alphas"]
    xs = list(range(len(alphas)))  # alpha = 0 first, then the decades, evenly
    for b, per in rows.items():
        pts = [(xs[alphas.index(a)], row) for a, row in per.items()]
        dx = 0.08 * (list(rows).index(b) - 0.5)  # the batches side by side
        line = ax.plot([x + dx for x, _ in pts], [statistics.median(r["report"]) for _, r in pts], marker="o")[0]
        for x, r in pts:  # every reporting seed (a diverged one at chance)
            ax.plot([x + dx] * len(r["report"]), r["report"], ".", color=line.get_color(), alpha=0.4)
        line.set_label(f"batch {b}")
        shares = [(x, r["cubic_share"]) for x, r in pts if r["cubic_share"]]
        ax2.plot([x for x, _ in shares], [s for _, s in shares], marker="o", label=f"batch {b}")
    for a_ in (ax, ax2):
        a_.set_xticks(xs, [f"{a:g}" for a in alphas])
        a_.set_xlabel("cubic_weight (alpha)")
        a_.legend(fontsize=7)
    ax.set(
        yscale="log",
        ylabel="final test error % (median; dots: reporting seeds)",
        title="cubic-weight: final test error",
    )
    ax2.set(yscale="log", ylabel="cubic force / |g| (median)", title="cubic-weight: the cubic force's share")
    save_figure(fig, out / "cubic_weight.png")


def verdict(summ: dict[str, Any]) -> str:
    """The rule-based verdict from the summary :func:`render_cubic_weight` returns."""
    if "default" not in summ:
        return "no results"
    better = [k for k, c in summ["contrasts"].items() if c["decision"] == "differs" and c["diff"] < 0]
    worse = [k for k, c in summ["contrasts"].items() if c["decision"] == "differs" and c["diff"] > 0]
    seen = (
        f"better than 1e-7 (batch/alpha): {', '.join(better)}" if better else "no alpha better than 1e-7 anywhere"
    ) + (f"; worse: {', '.join(worse)}" if worse else "; none worse")
    return f"{seen}: default **cubic_weight = {summ['default']:g}** ({summ['why']})"


STUDY = Study(
    name="cubic-weight",
    help=(
        "The cubic regularizer swept: alpha in {0, 1e-7, 1e-5, 1e-3, 1e-2, 1e-1, 1}, beta = 0, batches 256 and "
        "1,024 on MNIST-1D 36k (MLP, 50 epochs), each alpha tuned on the fine grid with 2 tuning seeds, then 8 "
        "reporting seeds: final test error, divergences, the largest stable rate, the cubic force's share of the "
        "gradient and epochs to 8/6/5%. " + RULE + " (quick: 4k set, batch 128, 6 epochs, alpha 0, 1e-7, 0.1)."
    ),
    full_cost_core_minutes=141,  # by the runs' clocks (2026-12-07, 234 runs; 71 min of wall time with --jobs 2)
    claim=(
        "Section 3.2, eq. (8)",
        "The cubic regularizer alpha/3 ||w - v||^3 convexifies the mini-batch objective along w - v, so that its "
        "Neumann series converges where the loss is locally non-convex.",
    ),
    run=cubic_weight,
    render=render_cubic_weight,
    verdict=verdict,
    unused_options=("schedule",),
)
