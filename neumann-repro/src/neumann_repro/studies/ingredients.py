"""ingredients: what the default Neumann optimizer is made of, one ingredient at a time.

With its default (``repulsive_weight=0``, ``cubic_weight=1e-7``) Neumann is Nesterov momentum on
displaced weights plus a burn-in of plain SGD, a momentum ramp, momentum resets, a cubic term and
evaluation at ``w - mu m``. Each variant here differs from the default in one of those, and is run
by critical-batch's protocol (same task, target, budget ladder and learning-rate search), with
seed 0 tuning and seeds 1-4 reporting: a budget reaches the target when the mean validation curve of
the four reporting seeds does. Each reporting seed's own first step at the target (in the cell's
smallest reaching budget; a seed that does not reach counts as twice the budget) makes the samples
that the verdict rule (``verdicts``: Welch's t-test on log steps) compares with the default's.

Then batch 1,024 at batch-scaling's fixed budget of 50 epochs (its tuning protocol, seeds 1-4
reporting): which ingredient makes the default's final test error differ from SGD+Nesterov's.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from ..ladder import REPORT_SEEDS, CellResult, Search, max_budget, report_seeds, run_searches, start_budget
from ..plotting import pyplot, save_figure, steps_axes
from ..runner import Runner
from ..runs import final
from ..study import Payload, Rendered, Settings, Study, base_cfg, cells_of, finish
from ..tables import fmt, plural
from ..tuning import Protocol, choose, tune
from ..verdicts import ERROR_MARGIN, ERROR_RULE, error_contrast, reporting, said_error, settle
from .batch_scaling import BATCH_VARIANTS
from .critical_batch import FULL as CB_FULL
from .critical_batch import QUICK as CB_QUICK
from .critical_batch import QUICK_REPORT, cell_results, contrast_table, ladder_text, median_steps, steps_cell

LABELS_SHORT = {"default": "the default", "sgd": "SGD+Nesterov"}
# name -> (label, what differs from the default's config, the metric its curves are read from)
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "default": ("Neumann (default)", {}, "val_error"),
    "no-cubic": ("no cubic term (alpha = 0)", dict(cubic_weight=0.0), "val_error"),
    "no-resets": ("no resets", dict(resets=False), "val_error"),
    "constant-mu": ("constant mu = 0.9 (no ramp)", dict(momentum=0.9), "val_error"),
    "no-burn-in": ("no burn-in", dict(burn_in_epochs=0), "val_error"),
    "warmup": ("burn-in replaced by a linear warm-up", dict(burn_in_epochs=0, warmup=True), "val_error"),
    "at-w": ("evaluated at w (not w - mu m)", {}, "val_error_at_w"),
    "bare": (
        "bare: all four off (SGD+Nesterov, no warm-up)",
        dict(cubic_weight=0.0, resets=False, momentum=0.9, burn_in_epochs=0),
        "val_error",
    ),
    "sgd": ("SGD+Nesterov (critical-batch's)", {}, "val_error"),
}
EVALS = 32  # evaluation points per budget: a spacing of 1/32 of the budget
WARMUP_FRAC = 0.05  # the baselines' warm-up in critical-batch, a share of the budget
FIXED = dict(batch=1024, epochs=50, warmup_epochs=5)  # batch-scaling's setting at its largest batch
FIXED_QUICK = dict(batch=256, epochs=4, warmup_epochs=1)


def settings(s: Settings) -> dict[str, Any]:
    if s.quick:
        return {**CB_QUICK, "batches": [256], "fixed": FIXED_QUICK, "n_report": QUICK_REPORT}
    return {**CB_FULL, "batches": [64, 256, 1024], "fixed": FIXED, "n_report": REPORT_SEEDS}


def fixed_protocol(quick: bool) -> Protocol:
    """The fixed-epoch cells' tuning: the ladder's fine grid, 2 tuning seeds scored by the worse."""
    n = QUICK_REPORT if quick else REPORT_SEEDS
    return Protocol(
        points=3, tune_seeds=2, final_seeds=2 + n, max_extensions=1 if quick else 6, grid="fine", score="worse"
    )


def _neumann_cfg(name: str, quick: bool) -> tuple[dict[str, Any], bool]:
    """The optimizer part of a variant's config (the default's for ``at-w``, which reads the same
    runs), and whether it warms its rate up as the baselines do."""
    if name == "sgd":
        return dict(BATCH_VARIANTS["sgd"][0]), True
    cfg: dict[str, Any] = {**BATCH_VARIANTS["neumann-default"][0], "eval_at_w": True}
    if quick:  # a 1-epoch burn-in: the quick budgets reach the Neumann phase
        cfg["burn_in_epochs"] = 1
    cfg.update(VARIANTS[name][1])
    return cfg, bool(cfg.pop("warmup", False))


def ingredients(runner: Runner, s: Settings) -> str:
    st = settings(s)
    train_size = len(runner.data(st["task"]).x_train)
    searches = []
    for name, (_, _, metric) in VARIANTS.items():
        opt, warm = _neumann_cfg(name, s.quick)
        for b in st["batches"]:
            cfg = base_cfg(task=st["task"], model="mlp", batch=b, evals=EVALS, **opt)
            cfg.pop("warmup_epochs")  # budgets are in steps: a warm-up is a share of the budget
            if warm:
                cfg["warmup_frac"] = WARMUP_FRAC
            top = max_budget(st, b, train_size)
            start = min(start_budget(st, b), top)
            guess = math.sqrt(b / 256)
            searches.append(
                Search(f"{name}/{b}", cfg, guess, start, st["first_budget"], top, st["target"], metric, st["n_report"])
            )
    runs = run_searches(runner, searches, "ingredients")
    flat = [r for cell in runs.values() for per in cell.values() for r in per]
    # batch-scaling's fixed epoch budget at its largest batch, every trained variant tuned
    fx = st["fixed"]
    protocol = fixed_protocol(s.quick)
    cells: dict[str, tuple[dict[str, Any], float]] = {}
    for name in VARIANTS:
        if name == "at-w":  # read from the default's runs
            continue
        opt, warm = _neumann_cfg(name, s.quick)
        cfg = base_cfg(task=st["task"], model="mlp", batch=fx["batch"], epochs=fx["epochs"], **opt)
        if warm:
            cfg["warmup_epochs"] = fx["warmup_epochs"]
        cells[f"fixed/{name}"] = (cfg, math.sqrt(fx["batch"] / 256))
    fixed = tune(runner, cells, protocol, "ingredients: fixed epochs")
    flat += [r for cell in fixed.values() for r in cell]
    payload = dict(
        study="ingredients",
        meta={
            **{k: v for k, v in st.items() if k != "n_report"},
            "variants": {k: v[0] for k, v in VARIANTS.items()},
            "metrics": {k: v[2] for k, v in VARIANTS.items()},
            "report_seeds": list(report_seeds(st["n_report"])),
            "evals": EVALS,
            "warmup_frac": WARMUP_FRAC,
            "protocol": protocol.as_dict(),
            **({"neumann_burn_in_epochs": 1} if s.quick else {}),
        },
        runs=flat,
    )
    return finish(runner, s, payload, render_ingredients)


# ---------------------------------------------------------------- rendering
def render_ingredients(payload: Payload, out_dir: Path) -> Rendered:
    meta = payload["meta"]
    target, batches = meta["target"], meta["batches"]
    cells = cells_of(payload["runs"])
    train_size = payload["runs"][0]["train_size"] if payload["runs"] else 0
    results = cell_results(cells, list(meta["variants"]), batches, target, meta["metrics"])
    burn = meta.get("neumann_burn_in_epochs", 5)
    labels = meta["variants"]
    lines = [
        "# ingredients: the default Neumann optimizer, one ingredient at a time\n",
        f"MLP on {meta['task']} ({train_size:,} training examples), critical-batch's task and target "
        f"(**{target:g}% validation error**). " + ladder_text(meta),
        f"The default has a {burn}-epoch burn-in, a 1-epoch momentum ramp from 0.5 to 0.9, resets after 10, 20, "
        "40, ... epochs and a cubic term of weight 1e-7; each row changes one thing. The warm-up row ramps the rate "
        f"linearly over the first {100 * meta['warmup_frac']:.0f}% of each budget, as the baselines do.\n",
        "Steps to the target (median of the reporting seeds):\n",
        "| variant | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    summary: dict[str, Any] = {"steps": {}, "contrasts": {}, "fixed": {}, "labels": labels}
    resolution = []
    for name, per_b in results.items():
        lines.append(
            f"| {labels[name]} | " + " | ".join(steps_cell(per_b.get(b), meta["first_budget"]) for b in batches) + " |"
        )
        for b in batches:
            med = median_steps(per_b.get(b))
            if med is not None:
                summary["steps"].setdefault(name, {})[str(b)] = med
                resolution.append(per_b[b].smallest.steps / meta["evals"] / med)  # type: ignore[union-attr]
    if resolution:
        lines.append(
            f"\nResolution: the evaluation spacing is {100 * min(resolution):.1f}-{100 * max(resolution):.1f}% of "
            f"the median steps to the target (median {100 * statistics.median(resolution):.1f}%).\n"
        )
    lines += contrast_table(
        results, "default", [n for n in results if n != "default"], batches, labels, summary["contrasts"]
    )
    lines += _fixed_rows(meta, cells, summary)
    _plot(meta, results, out_dir)
    return "\n".join(lines) + "\n", summary


def _fixed_rows(meta: dict[str, Any], cells: dict[str, list[dict[str, Any]]], summary: dict[str, Any]) -> list[str]:
    """The fixed-epoch table: test error over the reporting seeds at each variant's tuned rate, the
    default against every variant and SGD+Nesterov against every variant (one Holm family each)."""
    protocol, fx = Protocol(**meta["protocol"]), meta["fixed"]
    vals: dict[str, list[float]] = {}
    lrs: dict[str, float] = {}
    for name in meta["variants"]:
        src = "default" if name == "at-w" else name
        if f"fixed/{src}" not in cells:
            continue
        runs = cells[f"fixed/{src}"]
        lr = choose(runs, protocol.tune_seeds, protocol.score).lr
        at = [r for r in reporting(runs, protocol.tune_seeds) if r["config"]["lr"] == lr]
        metric = "test_error_at_w" if name == "at-w" else "test_error"
        vals[name], lrs[name] = [final(r, metric) for r in sorted(at, key=lambda r: r["config"]["seed"])], lr
    if not vals:
        return []
    against: dict[str, dict[str, dict[str, Any] | None]] = {}
    for ref in ("default", "sgd"):
        fam = {n: error_contrast(vals[ref], v) for n, v in vals.items() if n != ref and ref in vals}
        settle(list(fam.values()), ERROR_MARGIN)
        against[ref] = fam
    k = protocol.final_seeds - protocol.tune_seeds
    out = [
        f"\nBatch {fx['batch']:,} at a fixed budget of {fx['epochs']} epochs (batch-scaling's setting; warm-ups over "
        f"{plural(fx['warmup_epochs'], 'epoch')}), each variant's rate tuned on the fine grid by tuning seeds 0-"
        f"{protocol.tune_seeds - 1} scored by the worse; final test error (%) of the {k} reporting seeds, mean ± "
        f"std. {ERROR_RULE} Each column is one family.\n",
        "| variant | lr | test error | the default against it | SGD+Nesterov against it |",
        "|---|---|---|---|---|",
    ]
    for name, v in vals.items():
        m, sd = statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else math.nan
        cols = [
            said_error(against[ref].get(name), LABELS_SHORT[ref]) if name != ref else "—" for ref in ("default", "sgd")
        ]
        out.append(f"| {meta['variants'][name]} | {lrs[name]:g} | {fmt(m, sd)} | {cols[0]} | {cols[1]} |")
        summary["fixed"][name] = dict(lr=lrs[name], test_mean=m, test_std=sd, vs_default=cols[0], vs_sgd=cols[1])
    return out


def _plot(meta: dict[str, Any], results: dict[str, dict[int, CellResult]], out_dir: Path) -> None:
    if len(meta["batches"]) == 1:  # one batch size (a quick run): bars per variant, not a batch axis
        _bars(meta, results, out_dir)
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    styles: dict[str, dict[str, Any]] = {
        "default": dict(color="tab:blue", marker="o", lw=2.5),
        "sgd": dict(color="tab:green", marker="^", ls="--"),
    }
    for k, (name, per_b) in enumerate(results.items()):
        bs = [b for b in meta["batches"] if median_steps(per_b.get(b)) is not None]
        ys = [median_steps(per_b[b]) for b in bs]
        st = styles.get(name, dict(color=f"C{(k + 2) % 10}", marker="osvD^<>xP*"[k % 10], ls=":" if k % 2 else "-."))
        ax.plot([b * (1 + 0.015 * (k - 4)) for b in bs], ys, label=meta["variants"][name], ms=5, **st)
    steps_axes(ax, meta["batches"], meta["target"], f"ingredients: {meta['task']}, every point tuned")
    ax.legend(fontsize=7)
    save_figure(fig, out_dir / "ingredients.png")


def _bars(meta: dict[str, Any], results: dict[str, dict[int, CellResult]], out_dir: Path) -> None:
    """One bar per variant: its steps to the target at the one batch size (none where it missed)."""
    plt = pyplot()
    b = meta["batches"][0]
    names = list(results)
    steps = []
    for name in names:
        steps.append(median_steps(results[name].get(b)))
    fig, ax = plt.subplots(figsize=(7, 4.6))
    ys = range(len(names))
    ax.barh(list(ys), [s or 0 for s in steps], color=["tab:blue" if n == "default" else "tab:gray" for n in names])
    for y, s in zip(ys, steps, strict=True):
        ax.text(s or 0, y, f" {s:,.0f}" if s else " not reached", va="center", fontsize=8)
    ax.set_yticks(list(ys), [meta["variants"][n] for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set(
        xlabel=f"steps to {meta['target']:g}% validation error (fewer is better)",
        title=f"ingredients: {meta['task']}, batch {b}, every bar tuned",
    )
    save_figure(fig, out_dir / "ingredients.png")


def verdict(summ: dict[str, Any]) -> str:
    """Per ingredient, the batches where the default needs fewer or more steps than without it."""
    if not summ["contrasts"]:
        return "no verdict (fewer than 2 reporting seeds a side)"
    parts = []
    for name, per_b in summ["contrasts"].items():
        label = summ.get("labels", {}).get(name, name)
        by = {"fewer": [], "more": [], "equivalent": []}  # type: dict[str, list[str]]
        for b, c in per_b.items():
            key = ("fewer" if c["ratio"] < 1 else "more") if c["decision"] == "differs" else c["decision"]
            if key in by:
                by[key].append(b)
        said = [
            f"the default needs {k} steps at batch {', '.join(v)}" for k, v in by.items() if v and k != "equivalent"
        ]
        said += [f"within ±10% at batch {', '.join(by['equivalent'])}"] if by["equivalent"] else []
        parts.append(f"{label}: {'; '.join(said) if said else 'inconclusive at every batch'}")
    return "steps to the target, the default against each variant (Holm-adjusted rank tests): " + " | ".join(parts)


STUDY = Study(
    name="ingredients",
    help=(
        "What the default is made of: the default against eight variants that each change one ingredient "
        "(no cubic term, no resets, constant momentum, no burn-in, a warm-up instead, evaluation at w, all off, "
        "SGD+Nesterov), steps to 8% validation error at batches 64, 256 and 1,024 by critical-batch's protocol "
        "with 4 reporting seeds, and the final error at batch 1,024 and 50 epochs (quick: 4k set, batch 256, short "
        "budgets, 2 reporting seeds)."
    ),
    full_cost_core_minutes=130,  # by the runs' clocks (2026-12-07, 914 runs; some shared with critical-batch)
    claim=(
        "Section 3 (the algorithm), Table 1",
        "The Neumann optimizer's ingredients (the cubic and repulsive regularizers, burn-in, momentum schedule and "
        "resets) together make a large-batch optimizer that implicitly inverts the mini-batch Hessian.",
    ),
    run=ingredients,
    render=render_ingredients,
    verdict=verdict,
    unused_options=("epochs", "schedule", "seeds"),
)
