"""SUPERSEDED (issue 36): the ingredients study as it ran before the ladder protocol (neumann_repro.ladder). Kept
only to render the committed results of that protocol until its rerun lands; then this module goes.

ingredients: what the default Neumann optimizer is made of, one ingredient at a time.

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

from ..plotting import pyplot, save_figure, steps_axes
from ..runner import Runner
from ..runs import final
from ..study import Payload, Rendered, Settings, base_cfg, cells_of, finish
from ..tables import fmt, plural
from ..tuning import Protocol, choose, tune
from ..verdicts import compare, judge, reporting, said_p
from ._v1_critical_batch import FULL as CB_FULL
from ._v1_critical_batch import QUICK as CB_QUICK
from ._v1_critical_batch import CellResult, _Search, cell_results, max_budget, run_searches, start_budget
from .batch_scaling import BATCH_VARIANTS

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
REPORT_SEEDS = (1, 2, 3, 4)  # seed 0 tunes
QUICK_REPORT_SEEDS = (1, 2)
EVALS = 32  # evaluation points per budget: a spacing of 1/32 of the budget
WARMUP_FRAC = 0.05  # the baselines' warm-up in critical-batch, a share of the budget
FIXED = dict(batch=1024, epochs=50, warmup_epochs=5)  # batch-scaling's setting at its largest batch
FIXED_QUICK = dict(batch=256, epochs=4, warmup_epochs=1)
NOT_REACHED = 2  # a reporting seed that misses the target in the budget counts as this many budgets


def settings(s: Settings) -> dict[str, Any]:
    if s.quick:
        return {**CB_QUICK, "batches": [256], "fixed": FIXED_QUICK, "seeds": QUICK_REPORT_SEEDS}
    return {**CB_FULL, "batches": [64, 256, 1024], "fixed": FIXED, "seeds": REPORT_SEEDS}


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
    seeds = tuple(st["seeds"])
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
            searches.append(_Search(f"{name}/{b}", cfg, math.sqrt(b / 256), start, top, seeds=seeds, metric=metric))
    runs = run_searches(runner, searches, st, "ingredients")
    flat = [r for cell in runs.values() for per in cell.values() for r in per]
    # batch-scaling's fixed epoch budget at its largest batch, every trained variant tuned
    fx = st["fixed"]
    protocol = (
        Protocol(points=3, tune_seeds=1, final_seeds=1 + len(seeds), max_extensions=1)
        if s.quick
        else Protocol(points=5, tune_seeds=1, final_seeds=1 + len(seeds), max_extensions=6)
    )
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
            **{k: v for k, v in st.items() if k != "seeds"},
            "variants": {k: v[0] for k, v in VARIANTS.items()},
            "metrics": {k: v[2] for k, v in VARIANTS.items()},
            "report_seeds": list(seeds),
            "evals": EVALS,
            "warmup_frac": WARMUP_FRAC,
            "protocol": protocol.as_dict(),
            **({"neumann_burn_in_epochs": 1} if s.quick else {}),
        },
        runs=flat,
    )
    return finish(runner, s, payload, render_ingredients)


# ---------------------------------------------------------------- rendering
def seed_steps(result: CellResult) -> list[float]:
    """Each reporting seed's steps to the target in the cell's smallest reaching budget (a seed
    that misses it: ``NOT_REACHED`` budgets)."""
    b = result.smallest
    if b is None:
        return []
    return [float(h) if h is not None else float(NOT_REACHED * b.steps) for h in b.seed_hits.values()]


def _log2(values: list[float]) -> list[float]:
    return [math.log2(v) for v in values]


def render_ingredients(payload: Payload, out_dir: Path) -> Rendered:
    meta = payload["meta"]
    target, batches, seeds = meta["target"], meta["batches"], tuple(meta["report_seeds"])
    cells = cells_of(payload["runs"])
    train_size = payload["runs"][0]["train_size"] if payload["runs"] else 0
    results = cell_results(cells, list(meta["variants"]), batches, target, seeds, meta["metrics"])
    burn = meta.get("neumann_burn_in_epochs", 5)
    lines = [
        "# ingredients: the default Neumann optimizer, one ingredient at a time\n",
        f"MLP on {meta['task']} ({train_size:,} training examples), critical-batch's protocol: target "
        f"**{target:g}% validation error**, budgets on a ladder of powers of 2, at each budget the rate tuned on the "
        f"1-3-10 grid with seed 0, then seeds {', '.join(map(str, seeds))} (disjoint from the tuning seed) at the "
        f"chosen rate; a budget reaches the target when their mean validation error does, at one of {meta['evals']} "
        "evaluation points (a spacing of 1/"
        f"{meta['evals']} of the budget). The default has a {burn}-epoch burn-in, a 1-epoch momentum "
        "ramp from 0.5 to 0.9, resets after 10, 20, 40, ... epochs and a cubic term of weight 1e-7; each row "
        "changes one thing. The warm-up row ramps the rate linearly over the first "
        f"{100 * meta['warmup_frac']:.0f}% of each budget, as the baselines do.\n",
        "Steps to the target (smallest reaching budget, tuned rate; ✓: the budget below was tried and did not "
        "reach):\n",
        "| variant | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    summary: dict[str, Any] = {"steps": {}, "verdicts": {}, "fixed": {}, "labels": meta["variants"]}
    resolution = []
    for name, per_b in results.items():
        row = []
        for b in batches:
            r = per_b.get(b)
            s = r.smallest if r else None
            if r is None or s is None or s.first_hit is None:
                top = max(r.budgets) if r and r.budgets else 0
                row.append(f"not reached in {top:,} steps" if r else "—")
                continue
            resolution.append(s.steps / meta["evals"] / s.first_hit)
            mark = " ✓" if r.verified(meta["first_budget"]) else ""
            row.append(f"{s.first_hit:,} (budget {s.steps:,}, lr {s.lr:g}{'' if s.interior else ', edge'}){mark}")
            summary["steps"].setdefault(name, {})[str(b)] = s.first_hit
        lines.append(f"| {meta['variants'][name]} | " + " | ".join(row) + " |")
    if resolution:
        lines.append(
            f"\nResolution: the evaluation spacing is {100 * min(resolution):.1f}-{100 * max(resolution):.1f}% of "
            "the steps to the target (median "
            f"{100 * statistics.median(resolution):.1f}%).\n"
        )
    lines += [
        "Removing (or replacing) each ingredient, against the default, by the verdict rule (Welch's t-test at 5% on "
        "log2 of each reporting seed's steps to the target; a seed that misses it in the budget counts as "
        f"{NOT_REACHED} budgets). Each cell: the ratio of geometric means of the seeds' steps (variant / default) "
        "and the verdict.\n",
        "| variant against the default | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    base = results.get("default", {})
    for name, per_b in results.items():
        if name == "default":
            continue
        row = []
        for b in batches:
            mine, ref = seed_steps(per_b[b]) if b in per_b else [], seed_steps(base[b]) if b in base else []
            if not mine or not ref:
                row.append("—")
                continue
            word, p = compare(_log2(mine), _log2(ref))
            said = {"better": "saves steps", "worse": "costs steps", "cannot tell": "cannot tell"}[word]
            if p is None:  # (fewer than 2 reporting seeds a side: a quick run)
                said = "no verdict"
            ratio = 2 ** (statistics.fmean(_log2(mine)) - statistics.fmean(_log2(ref)))
            row.append(f"x{ratio:.2f}: {said} ({said_p(p, f'{len(mine)} vs {len(ref)} seeds')})")
            summary["verdicts"].setdefault(name, {})[str(b)] = dict(ratio=ratio, verdict=said)
        lines.append(f"| {meta['variants'][name]} | " + " | ".join(row) + " |")
    lines += _fixed_rows(meta, cells, summary)
    _plot(meta, results, out_dir)
    return "\n".join(lines) + "\n", summary


def _fixed_rows(meta: dict[str, Any], cells: dict[str, list[dict[str, Any]]], summary: dict[str, Any]) -> list[str]:
    """The fixed-epoch table: test error over the reporting seeds at each variant's tuned rate."""
    protocol, fx = Protocol(**meta["protocol"]), meta["fixed"]
    vals: dict[str, list[float]] = {}
    lrs: dict[str, float] = {}
    for name in meta["variants"]:
        src = "default" if name == "at-w" else name
        if f"fixed/{src}" not in cells:
            continue
        runs = cells[f"fixed/{src}"]
        lr = choose(runs, protocol.tune_seeds).lr
        at = [r for r in reporting(runs, protocol.tune_seeds) if r["config"]["lr"] == lr]
        metric = "test_error_at_w" if name == "at-w" else "test_error"
        vals[name], lrs[name] = [final(r, metric) for r in sorted(at, key=lambda r: r["config"]["seed"])], lr
    if not vals:
        return []
    out = [
        f"\nBatch {fx['batch']:,} at a fixed budget of {fx['epochs']} epochs (batch-scaling's setting; warm-ups over "
        f"{plural(fx['warmup_epochs'], 'epoch')}), each variant tuned by batch-scaling's protocol with seed 0, final "
        f"test error (%) of seeds 1-{protocol.final_seeds - 1}, mean ± std, against the default and SGD+Nesterov by "
        "the verdict rule:\n",
        "| variant | lr | test error | against the default | against SGD+Nesterov |",
        "|---|---|---|---|---|",
    ]
    for name, v in vals.items():
        m, sd = statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else math.nan
        against = ["—" if other == name or other not in vals else judge(v, vals[other]) for other in ("default", "sgd")]
        out.append(f"| {meta['variants'][name]} | {lrs[name]:g} | {fmt(m, sd)} | {against[0]} | {against[1]} |")
        summary["fixed"][name] = dict(lr=lrs[name], test_mean=m, test_std=sd, vs_default=against[0], vs_sgd=against[1])
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
        bs = [b for b in meta["batches"] if b in per_b and per_b[b].smallest is not None]
        ys = [per_b[b].smallest.first_hit for b in bs]  # type: ignore[union-attr]
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
        r = results[name].get(b)
        hit = r.smallest.first_hit if r is not None and r.smallest is not None else None
        steps.append(hit)
    fig, ax = plt.subplots(figsize=(7, 4.6))
    ys = range(len(names))
    ax.barh(list(ys), [s or 0 for s in steps], color=["tab:blue" if n == "default" else "tab:gray" for n in names])
    for y, s in zip(ys, steps, strict=True):
        ax.text(s or 0, y, f" {s:,}" if s else " not reached", va="center", fontsize=8)
    ax.set_yticks(list(ys), [meta["variants"][n] for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set(
        xlabel=f"steps to {meta['target']:g}% validation error (fewer is better)",
        title=f"ingredients: {meta['task']}, batch {b}, every bar tuned",
    )
    save_figure(fig, out_dir / "ingredients.png")


def verdict(summ: dict[str, Any]) -> str:
    """Per ingredient, the batches where removing it saves or costs steps (rule: ``verdicts``)."""
    v = summ.get("verdicts")
    if not v:
        return "no results"
    parts = []
    for name, per_b in v.items():
        saves = [b for b, r in per_b.items() if r["verdict"] == "saves steps"]
        costs = [b for b, r in per_b.items() if r["verdict"] == "costs steps"]
        said = [f"saves steps at batch {', '.join(saves)}"] if saves else []
        said += [f"costs steps at batch {', '.join(costs)}"] if costs else []
        label = summ.get("labels", {}).get(name, name)
        if all(r["verdict"] == "no verdict" for r in per_b.values()):
            parts.append(f"{label}: no verdict (fewer than 2 reporting seeds a side)")
            continue
        parts.append(f"{label}: {'; '.join(said) if said else 'cannot tell at any batch'}")
    return "steps to the target against the default (Welch's t-test at 5% on log steps): " + " | ".join(parts)
