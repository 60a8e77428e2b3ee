"""Steps to a target versus batch size, every point tuned (Shallue et al. 2019), with the gradient
noise scale (McCandlish et al. 2018) as the predictor of where scaling ends.

For each optimizer and batch size (a *cell*) the ladder protocol (:mod:`neumann_repro.ladder`):
budgets on a ladder of powers of 2, the rate tuned at each on the fine grid by 2 tuning seeds scored
by the worse, the smallest budget that both tuning seeds reach chosen on them alone, then reporting
seeds at that budget and rate, each with its own steps to the target or a miss. The verdicts compare
cells' reporting seeds by an exact rank test with misses tied last, Holm-adjusted, with intervals
(:mod:`neumann_repro.verdicts`).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from ..ladder import REPORT_SEEDS, CellResult, Search, cell_result, max_budget, report_seeds, run_searches, start_budget
from ..optimizers import LABELS
from ..plotting import BAND, pyplot, save_figure, steps_axes, style
from ..runner import Runner
from ..study import Payload, Rendered, Settings, Study, base_cfg, cells_of, finish
from ..tables import plural
from ..verdicts import STEPS_MARGIN, said_steps, settle, steps_contrast
from .batch_scaling import BATCH_VARIANTS

VARIANTS = ["neumann-default", "neumann", "sgd", "adamw", "lars", "lamb"]
QUICK_VARIANTS = ["neumann-default", "sgd", "lars"]  # the verdict's rows: a quick run stays under a minute
FULL = dict(
    task="mnist1d-36k",
    batches=[16, 64, 256, 1024, 2048, 4096],
    target=8.0,  # % validation error
    first_budget=2**6,  # the ladder: first_budget * 2^k up to max_budget
    max_budget=2**17,
    max_epochs=512,  # and no budget of more epochs than this: a cell that has not reached by then does not
    start_examples=150_000,  # each search starts at the rung nearest start_examples / batch (about 4 epochs)
)
QUICK = dict(
    task="mnist1d-4k",
    batches=[64, 256],
    target=50.0,
    first_budget=2**7,
    max_budget=2**10,
    max_epochs=512,
    start_examples=30_000,
)
WARMUP_FRAC = 0.05  # baselines' linear warmup, a share of each budget
EVALS = 32  # evaluation points per budget: a spacing of 1/32 of the budget (about 5% of steps-to-target)
QUICK_REPORT = 2  # reporting seeds in a quick run (full: ladder.REPORT_SEEDS)


def settings(s: Settings) -> dict[str, Any]:
    st = dict(QUICK if s.quick else FULL)
    if s.task4k != "mnist1d-4k" or s.task_large != "mnist1d-36k":  # --task replaces the data set
        st["task"] = s.task_large if not s.quick else s.task4k
    return st


def searches_for(
    st: dict[str, Any], variants: dict[str, tuple[dict[str, Any], float]], train_size: int, quick: bool
) -> list[Search]:
    """One ladder search per variant and batch (``variants``: name -> (config part, rate guess at
    batch 256)); baselines warm up over ``WARMUP_FRAC`` of each budget unless their config says otherwise."""
    out = []
    n_report = QUICK_REPORT if quick else REPORT_SEEDS
    for name, (v, centre) in variants.items():
        for b in st["batches"]:
            cfg = base_cfg(task=st["task"], model="mlp", batch=b, evals=EVALS, **v)
            cfg.pop("warmup_epochs")  # budgets are in steps: the warmup is a share of the budget
            if v["optimizer"] != "neumann":
                cfg.setdefault("warmup_frac", WARMUP_FRAC)
            elif quick:  # a 1-epoch burn-in: the quick budgets reach the Neumann phase
                cfg["burn_in_epochs"] = 1
            top = max_budget(st, b, train_size)
            guess = centre * math.sqrt(b / 256)
            start = min(start_budget(st, b), top)
            out.append(
                Search(f"{name}/{b}", cfg, guess, start, st["first_budget"], top, st["target"], n_report=n_report)
            )
    return out


def critical_batch(runner: Runner, s: Settings) -> str:
    st = settings(s)
    train_size = len(runner.data(st["task"]).x_train)
    names = [n for n in VARIANTS if n in QUICK_VARIANTS] if s.quick else VARIANTS
    variants = {n: BATCH_VARIANTS[n] for n in names}
    if "neumann-default" in variants:  # evaluated at w too, as ingredients' default: the same runs (cache)
        v, centre = variants["neumann-default"]
        variants["neumann-default"] = ({**v, "eval_at_w": True}, centre)
    searches = searches_for(st, variants, train_size, s.quick)
    runs = run_searches(runner, searches, "critical-batch")
    flat = [r for cell in runs.values() for per in cell.values() for r in per]
    # the gradient noise scale along the tuned run of each optimizer at one batch size
    probe_batch = st["batches"][len(st["batches"]) // 2]
    probes: list[tuple[str, dict[str, Any]]] = []
    for x in searches:
        name, b = x.name.split("/")
        found = cell_result([r for per in runs[x.name].values() for r in per], st["target"]).smallest
        if int(b) == probe_batch and found is not None:
            probes.append((name, {**x.base, "steps": found.steps, "lr": found.lr, "seed": 0, "noise_scale": True}))
    probed = runner.run_all([c for _, c in probes], "critical-batch: gradient noise scale probes")
    for (name, _), res in zip(probes, probed, strict=True):
        flat.append({"cell": f"noise/{name}", **res})
    payload = dict(
        study="critical-batch",
        meta={**ladder_meta(st, names, s.quick), "probe_batch": probe_batch},
        runs=flat,
    )
    return finish(runner, s, payload, render_critical_batch)


def ladder_meta(st: dict[str, Any], names: list[str], quick: bool) -> dict[str, Any]:
    """A ladder study's meta: its settings, variants, reporting seeds, warm-up and evaluation spacing."""
    return {
        **st,
        "variants": names,
        "report_seeds": list(report_seeds(QUICK_REPORT if quick else REPORT_SEEDS)),
        "warmup_frac": WARMUP_FRAC,
        "evals": EVALS,
        "ladder": 2,  # the ladder protocol (neumann_repro.ladder)
        **({"neumann_burn_in_epochs": 1} if quick else {}),
    }


# ---------------------------------------------------------------- rendering
def critical_batch_size(steps: dict[int, float]) -> int | None:
    """The largest batch B whose examples to the target, S(B) B, are at most twice the fewest
    examples at any batch up to B (at least 50% of the ideal speed-up from the most efficient
    smaller batch), among the batches up to the first that fails the rule.

    Measured from the most efficient batch rather than the smallest, so an optimizer that is slow
    at the smallest batch (Neumann's 5-epoch burn-in is 11,250 plain-SGD steps at batch 16) does
    not seem to scale further for it."""
    crit, best = None, math.inf
    for b in sorted(steps):
        examples = steps[b] * b
        best = min(best, examples)
        if examples <= 2 * best:
            crit = b
        else:
            break
    return crit


def noise_scale_near_target(run: dict[str, Any], target: float) -> float | None:
    """B_simple = mean tr(Sigma) / mean |G|^2 over the evaluation points on the way to the target,
    those with a validation error above the target and at most twice it (McCandlish et al. relate
    the critical batch to the noise scale at the loss to be reached). Past the target the training
    loss is near 0 on this task, both estimates shrink towards their noise and the ratio means
    nothing. None where no point lies in the band or |G|^2 averages <= 0."""
    band = [h for h in run["history"] if "trace_sigma" in h and target < h["val_error"] <= 2 * target]
    if not band:
        return None
    g2 = statistics.fmean(h["grad_sq"] for h in band)
    return statistics.fmean(h["trace_sigma"] for h in band) / g2 if g2 > 0 else None


def cell_results(
    cells: dict[str, list[dict[str, Any]]],
    variants: list[str],
    batches: list[int],
    target: float,
    metrics: dict[str, str] | None = None,
) -> dict[str, dict[int, CellResult]]:
    """Every ``variant/batch`` cell's :class:`CellResult` (``metrics``: the curve each variant is read from)."""
    out: dict[str, dict[int, CellResult]] = {}
    for name in variants:
        for b in batches:
            if f"{name}/{b}" in cells:
                metric = (metrics or {}).get(name, "val_error")
                out.setdefault(name, {})[b] = cell_result(cells[f"{name}/{b}"], target, metric)
    return out


def median_steps(r: CellResult | None) -> float | None:
    """The median of the reporting seeds' steps to the target (a miss counts as more than any
    budget); ``None`` where the cell has no reaching budget or half its seeds or more missed."""
    rep = r.report if r is not None else []
    if not rep:
        return None
    m = statistics.median(rep)
    return m if math.isfinite(m) else None


def steps_cell(r: CellResult | None, first_budget: int) -> str:
    """A table cell: median steps of the reporting seeds, how many reached, the budget and rate, and
    what the next rate up did."""
    s = r.smallest if r is not None else None
    if r is None:
        return "—"
    if s is None:
        top = max(r.budgets) if r.budgets else 0
        return f"not reached in {top:,} steps"
    med = median_steps(r)
    mark = " ✓" if r.verified(first_budget) else ""
    inside = "" if s.interior else ", edge of the rates tried"
    head = f"{med:,.0f}" if med is not None else "median not reached"
    return (
        f"{head} ({s.n_reached} of {len(s.hits)} reached; budget {s.steps:,}{mark}, lr {s.lr:g}{inside}; "
        f"next up: {s.next_up()})"
    )


def ladder_text(meta: dict[str, Any]) -> str:
    """The ladder protocol in one paragraph, for the studies that use it."""
    seeds = meta["report_seeds"]
    return (
        "The ladder protocol (`neumann_repro.ladder`): budgets of steps on a ladder of powers of 2 (none longer "
        f"than {meta.get('max_epochs', 512)} epochs), each decaying the rate to 0 by cosine. At each budget the "
        "learning rate is tuned on a grid of 4 rates per decade (extended until the choice is strictly inside the "
        "rates tried) with **2 tuning seeds (0, 1)**, each rate scored by its worse seed (a miss or a divergence "
        "on either counts against it); a budget reaches the target when both tuning seeds do. The smallest "
        "reaching budget and its rate are chosen on the tuning seeds alone (✓: the budget below was tried and "
        f"did not reach). Then **{len(seeds)} reporting seeds ({seeds[0]}-{seeds[-1]})** run at that budget and "
        "rate; each reports its own first evaluation step at the target, or a miss (censored, never imputed). "
        f"Evaluations every 1/{meta['evals']} of a budget. Tables show the reporting seeds' median and how many "
        "reached; 'next up' says what the next rate up did on the tuning seeds.\n"
    )


STEPS_RULE = (
    "Steps verdicts: the ratio of steps (2 to the Hodges-Lehmann shift of log2 steps between the two cells' "
    "reporting seeds) with its distribution-free 95% interval; an exact rank test with misses tied last "
    "(`verdicts.rank_p`), its p Holm-adjusted over the family of the table; 'equivalent within ±10%' where "
    "the 90% interval lies inside ±10% (two one-sided tests at 5%), 'inconclusive' otherwise."
)


def contrast_table(
    results: dict[str, dict[int, CellResult]],
    ref: str,
    others: list[str],
    batches: list[int],
    labels: dict[str, str],
    out: dict[str, Any],
) -> list[str]:
    """The steps verdicts of ``ref`` against each of ``others`` at every batch, one Holm family
    (``out``: name -> batch -> contrast)."""
    if ref not in results:
        return []
    family: list[tuple[str, int, dict[str, Any] | None]] = []
    for name in others:
        for b in batches:
            mine, theirs = results.get(ref, {}).get(b), results.get(name, {}).get(b)
            if mine is not None and theirs is not None and mine.report and theirs.report:
                family.append((name, b, steps_contrast(mine.report, theirs.report)))
    settle([c for _, _, c in family], STEPS_MARGIN)
    n = sum(c is not None for _, _, c in family)
    lines = [
        f"\n{labels[ref]} against each, steps to the target: the ratio of its steps to the other's (above 1: "
        f"{labels[ref]} needs more steps, worse), at every batch where both cells have reporting seeds; the family "
        f"is this table's {n} tests. {STEPS_RULE}\n",
        f"| {labels[ref]} against | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    for name in others:
        row = []
        for b in batches:
            hit = [c for m, bb, c in family if m == name and bb == b]
            if not hit:
                row.append("—")
                continue
            a, z = results[ref][b].smallest, results[name][b].smallest
            assert a is not None and z is not None  # (a contrast exists only where both have reporting seeds)
            said = f"{a.n_reached} of {len(a.hits)} vs {z.n_reached} of {len(z.hits)} reached"
            row.append(said_steps(hit[0], said, n))
            if hit[0] is not None:
                out.setdefault(name, {})[str(b)] = {k: v for k, v in hit[0].items() if k != "ci90"}
        lines.append(f"| {labels[name]} | " + " | ".join(row) + " |")
    return lines


def render_critical_batch(payload: Payload, out_dir: Path) -> Rendered:
    meta = payload["meta"]
    target, batches = meta["target"], meta["batches"]
    cells = cells_of(payload["runs"])
    train_size = payload["runs"][0]["train_size"] if payload["runs"] else 0
    results = cell_results(cells, meta["variants"], batches, target)
    noise = {
        name: noise_scale_near_target(cells[f"noise/{name}"][0], target)
        for name in meta["variants"]
        if f"noise/{name}" in cells
    }
    burn = meta.get("neumann_burn_in_epochs", 5)
    lines = [
        "# critical-batch: steps to a target versus batch size (Shallue et al. 2019)\n",
        f"MLP on {meta['task']} ({train_size:,} training examples). Target: **{target:g}% validation error**. "
        "Every point tuned. " + ladder_text(meta),
        f"Baselines warm up over the first {100 * meta['warmup_frac']:.0f}% of each budget. Neumann keeps "
        + (
            "the paper's epoch-denominated defaults (5 epochs"
            if burn == 5
            else f"epoch-denominated schedules ({plural(burn, 'epoch')}"
        )
        + " of burn-in, first reset after 10 epochs, a 1-epoch "
        "momentum ramp), whose length in steps falls with the batch (burn-in / first reset interval): "
        + ", ".join(
            f"{burn * max(1, train_size // b):,} / {10 * max(1, train_size // b):,} steps at batch {b}" for b in batches
        )
        + ".\n",
        "Steps to the target (median of the reporting seeds):\n",
        "| optimizer | " + " | ".join(f"batch {b}" for b in batches) + " | critical batch |",
        "|---|" + "---|" * (len(batches) + 1),
    ]
    summary: dict[str, Any] = {"contrasts": {}}
    for name, per_b in results.items():
        steps = {b: m for b in batches if (m := median_steps(per_b.get(b))) is not None}
        crit = critical_batch_size(steps)
        row = [steps_cell(per_b.get(b), meta["first_budget"]) for b in batches]
        summary[name] = dict(steps={str(b): v for b, v in steps.items()}, critical=crit, noise_scale=noise.get(name))
        lines.append(f"| {LABELS[name]} | " + " | ".join(row) + f" | {crit if crit else '—'} |")
    lines += contrast_table(
        results,
        "neumann-default",
        [n for n in results if n != "neumann-default"],
        batches,
        {n: LABELS[n] for n in results},
        summary["contrasts"],
    )
    lines += [
        "\nCritical batch: the largest batch B whose examples to the target, S(B) x B, are at most twice the "
        "fewest at any batch up to B (at least half the ideal speed-up from the most efficient smaller batch), "
        "among the batches up to the first that fails; under perfect scaling S(B) x B stays constant.\n",
        f"Gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018), measured along each "
        f"optimizer's tuned run at batch {meta['probe_batch']} (tuning seed 0), at the evaluation points on the way "
        f"to the target (validation error above {target:g}% and at most {2 * target:g}%), from unbiased estimators "
        "(8 batches of 32 and one of 2,048 at each point) whose numerators and denominators are averaged separately. "
        "Past the target the training loss is near 0, both estimates fall to their noise and the ratio means nothing; "
        "the right-hand plot shows each point's estimate along the run.\n",
        f"| optimizer | B_simple at {target:g}-{2 * target:g}% validation error |",
        "|---|---|",
    ]
    for name in meta["variants"]:
        v = noise.get(name)
        lines.append(f"| {LABELS[name]} | {f'{v:,.0f}' if v else '—'} |")
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.6))
    for name in meta["variants"]:
        if f"noise/{name}" not in cells:
            continue
        pts = [h for h in cells[f"noise/{name}"][0]["history"] if "trace_sigma" in h and h["grad_sq"] > 0]
        ax2.plot(
            [h["val_error"] for h in pts],
            [h["trace_sigma"] / h["grad_sq"] for h in pts],
            **{**style(name), "ls": "none"},
            ms=4,
            label=LABELS[name],
        )
    ax2.axvspan(target, 2 * target, color=BAND, alpha=0.25, label="the band averaged in the table")
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="validation error (%) along the run",
        ylabel="B_simple at that point (one estimate)",
        title=f"gradient noise scale along the tuned runs at batch {meta['probe_batch']}",
    )
    ax2.invert_xaxis()
    seen = [
        h["val_error"] for n in meta["variants"] if f"noise/{n}" in cells for h in cells[f"noise/{n}"][0]["history"]
    ]
    seen = [v for v in seen if v > 0]
    if seen:  # the axis spans the data (inverted: high errors on the left)
        ax2.set_xlim(max(seen) * 1.1, min(seen) / 1.1)
    ticks = [v for v in (5, 8, 10, 16, 20, 30, 50, 90) if not seen or min(seen) / 1.1 <= v <= max(seen) * 1.1]
    ax2.set_xticks(ticks, [str(v) for v in ticks])
    ax2.minorticks_off()
    ax2.legend(fontsize=7)
    for name, per_b in results.items():
        bs = [b for b in batches if median_steps(per_b.get(b)) is not None]
        ys = [median_steps(per_b[b]) for b in bs]
        if bs:
            # markers apart and lines a little thicker below: rows that coincide (AdamW, LAMB) stay visible
            k = list(results).index(name)
            ax.plot(bs, ys, label=LABELS[name], lw=1 + 0.4 * (len(results) - k), ms=4 + len(results) - k, **style(name))
    ref = [(b, m) for per in results.values() for b, r in per.items() if (m := median_steps(r)) is not None]
    if ref:
        b0 = min(batches)
        s0 = [s for b, s in ref if b == b0]
        if s0:  # from the fastest optimizer at the smallest batch
            ax.plot(batches, [min(s0) * b0 / b for b in batches], color="gray", lw=1, ls=":", label="perfect scaling")
    vals = [v for v in noise.values() if v]
    if vals:
        ax.axvspan(min(vals), max(vals), color=BAND, alpha=0.25, label="B_simple on the way to the target")
    steps_axes(ax, batches, target, f"critical-batch: {meta['task']}, every point tuned")
    ax.legend(fontsize=7)
    save_figure(fig, out_dir / "critical_batch.png")
    return "\n".join(lines) + "\n", summary


def verdict(summ: dict[str, Any]) -> str:
    """The rule-based verdict from the summary :func:`render_critical_batch` returns (rule: ``verdicts``)."""
    neu, parts = summ.get("neumann-default"), []
    if not neu:
        return "no results"
    for base in ("sgd", "lars"):
        other = summ.get(base)
        if other:
            a, b = neu["critical"], other["critical"]
            word = "larger" if (a or 0) > (b or 0) else ("the same" if a == b else "smaller")
            parts.append(f"critical batch of Neumann (default) {a}, of {LABELS[base]} {b} ({word})")
    extends = all((neu["critical"] or 0) > (summ[o]["critical"] or 0) for o in ("sgd", "lars") if o in summ)
    out = "; ".join(parts) + f": **{'reproduced' if extends else 'not reproduced'}**"
    said = {"fewer steps": [], "more steps": [], "equivalent": []}  # type: dict[str, list[str]]
    for base, per_b in summ["contrasts"].items():
        for b, c in per_b.items():
            key = {"differs": "fewer steps" if c["ratio"] < 1 else "more steps"}.get(c["decision"], c["decision"])
            if key in said:
                said[key].append(f"{LABELS[base]} at {b}")
    words = [f"{k} than {', '.join(v)}" for k, v in said.items() if v and k != "equivalent"]
    if said["equivalent"]:
        words.append(f"within ±10% of {', '.join(said['equivalent'])}")
    return (
        out
        + ". In steps to the target (Holm-adjusted rank tests), Neumann (default) needs "
        + ("; ".join(words) if words else "no fewer and no more than any baseline, and is equivalent to none")
    )


STUDY = Study(
    name="critical-batch",
    help=(
        "Steps to a target validation error versus batch size (16 to 4,096 on MNIST-1D 36k, MLP), "
        "every point tuned over a ladder of step budgets and learning rates, for Neumann (default and paper's "
        "regularizers), SGD+Nesterov, AdamW, LARS and LAMB; each optimizer's critical batch size and the gradient "
        "noise scale (quick: 4k set, batches 64 and 256, short budgets, Neumann, SGD+Nesterov and LARS)."
    ),
    full_cost_core_minutes=286,  # by the runs' clocks (2026-12-07, 1,246 runs; 146 min of wall time with --jobs 2)
    claim=(
        "Section 1 (the central hypothesis), Table 3",
        "The optimizer 'is able to efficiently use large batches': in steps to a target, perfect scaling should "
        "reach larger batches than with momentum SGD (and, by Zhang et al. 2019's noisy quadratic model, as with "
        "other preconditioned methods).",
    ),
    run=critical_batch,
    render=render_critical_batch,
    verdict=verdict,
    unused_options=("epochs", "schedule", "seeds"),  # budgets in steps, cosine per budget, the ladder's seeds
)
