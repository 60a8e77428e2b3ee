"""SUPERSEDED (issue 36): the critical-batch study as it ran before the ladder protocol (neumann_repro.ladder). Kept
only to render the committed results of that protocol until its rerun lands; then this module goes.

Steps to a target versus batch size, every point tuned (Shallue et al. 2019), with the gradient
noise scale (McCandlish et al. 2018) as the predictor of where scaling ends.

For each optimizer and batch size (a *cell*), a search over a geometric ladder of step budgets
(powers of 2). At each budget the learning rate is tuned on the 1-3-10 grid of the tuning
protocol (seed 0; the chosen rate is the one whose run first reaches the target, else the lowest
final validation error; the grid is extended while the choice is on its edge), then the chosen rate
is trained with a second seed. The budget *reaches* the target when the mean validation-error curve
of the two seeds goes at or below it. The search walks up the ladder until a budget reaches, and
down until one does not: a cell's result is its smallest reaching budget and, within it, the first
evaluation step at which the two-seed mean is at or below the target (its steps-to-target). Every
budget decays the learning rate to 0 by cosine at its end. :func:`cell_result` recomputes all of
it from the runs, so the report needs no training.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..optimizers import BASELINES, LABELS
from ..plotting import BAND, pyplot, save_figure, steps_axes, style
from ..runner import Runner, config_key
from ..runs import CHANCE_ERROR
from ..study import Payload, Rendered, Settings, base_cfg, cells_of, finish
from ..tables import plural
from ..tuning import lr_at, lr_index
from .batch_scaling import BATCH_VARIANTS

VARIANTS = ["neumann-default", "neumann", "sgd", "adamw", "lars", "lamb"]
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
    batches=[32, 256],
    target=50.0,
    first_budget=2**7,
    max_budget=2**10,
    max_epochs=512,
    start_examples=30_000,
)
SEEDS = 2  # seed 0 tunes, seeds 0 and 1 make the mean curve
DEFAULT_SEEDS = tuple(range(SEEDS))
WARMUP_FRAC = 0.05  # baselines' linear warmup, a share of each budget
EVALS = 16  # evaluation points per run
MAX_EXTENSIONS = 4  # learning-rate grid extensions per budget


def _first_hit(curve: list[tuple[int, float]], target: float) -> int | None:
    for step, err in curve:
        if err <= target:
            return step
    return None


def _curve(run: dict[str, Any], metric: str = "val_error") -> list[tuple[int, float]]:
    """(step, validation error) of a run; a diverged run counts as chance from where it stopped."""
    pts = [(h["step"], h[metric] if math.isfinite(h[metric]) else CHANCE_ERROR) for h in run["history"]]
    if run["diverged"] or not pts:
        pts.append((run["config"]["steps"], CHANCE_ERROR))
    return pts


def _score(run: dict[str, Any], target: float, metric: str = "val_error") -> tuple[float, float]:
    """How a seed-0 run ranks its learning rate: first step at the target (inf if never), then the
    final validation error."""
    curve = _curve(run, metric)
    hit = _first_hit(curve, target)
    return (hit if hit is not None else math.inf, curve[-1][1])


@dataclass
class Budget:
    """One budget of a cell: the learning rates tried, the choice, and the two-seed outcome."""

    steps: int
    scores: dict[float, tuple[float, float]]
    lr: float
    interior: bool
    mean_curve: list[tuple[int, float]] | None = None  # None until the second seed ran
    first_hit: int | None = None
    seed_hits: dict[int, int | None] = field(default_factory=dict)  # each seed's own first step at the target

    @property
    def reached(self) -> bool:
        return self.first_hit is not None


def budget_result(
    runs: list[dict[str, Any]], target: float, seeds: tuple[int, ...] = DEFAULT_SEEDS, metric: str = "val_error"
) -> Budget:
    """The choice at one budget from its runs (pure): seed 0 tunes, ``seeds`` make the mean curve."""
    steps = runs[0]["config"]["steps"]
    scores = {float(r["config"]["lr"]): _score(r, target, metric) for r in runs if r["config"]["seed"] == 0}
    best = min(scores, key=lambda lr: (*scores[lr], lr))
    lrs = sorted(scores)
    b = Budget(steps, scores, best, len(lrs) >= 3 and lrs[0] < best < lrs[-1])
    at = {r["config"]["seed"]: r for r in runs if float(r["config"]["lr"]) == best and r["config"]["seed"] in seeds}
    if len(at) == len(seeds):
        curves = [dict(_curve(at[s], metric)) for s in seeds]
        common = sorted(set.intersection(*(set(c) for c in curves)))
        b.mean_curve = [(s, statistics.fmean(c[s] for c in curves)) for s in common]
        b.first_hit = _first_hit(b.mean_curve, target)
        b.seed_hits = {s: _first_hit(_curve(at[s], metric), target) for s in seeds}
    return b


@dataclass
class CellResult:
    budgets: dict[int, Budget] = field(default_factory=dict)

    @property
    def smallest(self) -> Budget | None:
        """The smallest budget whose tuned two-seed mean reaches the target."""
        reached = [b for s, b in sorted(self.budgets.items()) if b.reached]
        return reached[0] if reached else None

    def verified(self, first_budget: int) -> bool:
        """The budget below the smallest reaching one was tried and did not reach (or there is none)."""
        s = self.smallest
        if s is None:
            return False
        below = self.budgets.get(s.steps // 2)
        return s.steps <= first_budget or (below is not None and below.mean_curve is not None and not below.reached)


def cell_result(
    runs: list[dict[str, Any]], target: float, seeds: tuple[int, ...] = DEFAULT_SEEDS, metric: str = "val_error"
) -> CellResult:
    by_budget: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        by_budget.setdefault(int(r["config"]["steps"]), []).append(r)
    return CellResult({s: budget_result(rs, target, seeds, metric) for s, rs in sorted(by_budget.items())})


# ---------------------------------------------------------------- the search
@dataclass
class _Search:
    """One cell's walk along the budget ladder (resumable: every decision is a function of runs)."""

    name: str
    base: dict[str, Any]
    centre: float
    budget: int
    max_budget: int
    tried: dict[int, set[int]] = field(default_factory=dict)  # budget -> grid indices of lrs
    extensions: dict[int, int] = field(default_factory=dict)
    done: bool = False
    seeds: tuple[int, ...] = DEFAULT_SEEDS  # the seeds whose mean curve decides (seed 0 tunes)
    metric: str = "val_error"  # the curve that is searched (a run record's history key)

    def result(self, runs: list[dict[str, Any]], target: float) -> Budget:
        return budget_result(runs, target, self.seeds, self.metric)

    def cfg(self, steps: int, lr: float, seed: int) -> dict[str, Any]:
        return {**self.base, "steps": steps, "lr": lr, "seed": seed}


def _plan(search: _Search, runs: dict[int, list[dict[str, Any]]], st: dict[str, Any]) -> list[dict[str, Any]]:
    """The configs this cell needs next (empty when it is done), advancing its state on the way."""
    target, lo, hi = st["target"], st["first_budget"], search.max_budget
    while not search.done:
        steps = search.budget
        if steps not in search.tried:
            centre = search.centre
            near = [s for s in search.tried if search.tried[s]]
            if near:  # start from the choice at the nearest budget tried
                nearest = min(near, key=lambda s: abs(math.log2(s / steps)))
                centre = search.result(runs[nearest], target).lr
            i = lr_index(centre)
            search.tried[steps] = {i - 1, i, i + 1}
            search.extensions[steps] = 0
        have = {(float(r["config"]["lr"]), r["config"]["seed"]) for r in runs.get(steps, [])}
        need = [search.cfg(steps, lr_at(i), 0) for i in sorted(search.tried[steps]) if (lr_at(i), 0) not in have]
        if need:
            return need
        b = search.result(runs[steps], target)
        if not b.interior and search.extensions[steps] < MAX_EXTENSIONS:
            i, idx = lr_index(b.lr), search.tried[steps]
            idx.add(i - 1 if i == min(idx) else i + 1)
            search.extensions[steps] += 1
            continue
        need = [search.cfg(steps, b.lr, s) for s in search.seeds if (b.lr, s) not in have]
        if need:
            return need
        result = cell_result([r for rs in runs.values() for r in rs], target, search.seeds, search.metric)
        if b.reached:  # the search only walks down from a reaching budget: it is the smallest so far
            if result.verified(lo):
                search.done = True
            else:
                search.budget = steps // 2
        else:
            above = result.budgets.get(steps * 2)
            if steps >= hi or (above is not None and above.reached):
                search.done = True
            else:
                search.budget = steps * 2
    return []


def run_searches(
    runner: Runner, searches: list[_Search], st: dict[str, Any], study: str
) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """Walk every cell's ladder in rounds (each round's runs trained together, through the cache):
    each cell's runs by budget, tagged with ``"cell"``."""
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {x.name: {} for x in searches}
    round_ = 0
    while True:
        plan = [(x, c) for x in searches for c in _plan(x, runs[x.name], st)]
        if not plan:
            return runs
        round_ += 1
        unique = {config_key(c): c for _, c in plan}  # cells that search the same runs train them once
        desc = f"{study}: round {round_} of budgets and rates ({len(unique)} runs)"
        done = dict(zip(unique, runner.run_all(list(unique.values()), desc), strict=True))
        for x, c in plan:
            runs[x.name].setdefault(int(c["steps"]), []).append({"cell": x.name, **done[config_key(c)]})


def max_budget(st: dict[str, Any], batch: int, train_size: int) -> int:
    """The highest rung of a cell: at most ``max_budget`` steps and ``max_epochs`` epochs."""
    b = st["first_budget"]
    while 2 * b <= min(st["max_budget"], st["max_epochs"] * train_size / batch):
        b *= 2
    return b


def start_budget(st: dict[str, Any], batch: int) -> int:
    """The ladder rung nearest ``start_examples / batch`` steps (within the ladder)."""
    k = round(math.log2(max(1.0, st["start_examples"] / batch / st["first_budget"])))
    return min(st["max_budget"], st["first_budget"] * 2 ** max(0, k))


def settings(s: Settings) -> dict[str, Any]:
    st = dict(QUICK if s.quick else FULL)
    if s.task4k != "mnist1d-4k" or s.task_large != "mnist1d-36k":  # --task replaces the data set
        st["task"] = s.task_large if not s.quick else s.task4k
    return st


def critical_batch(runner: Runner, s: Settings) -> str:
    st = settings(s)
    train_size = len(runner.data(st["task"]).x_train)
    searches = []
    for name in VARIANTS:
        v, centre = BATCH_VARIANTS[name]
        for b in st["batches"]:
            cfg = base_cfg(task=st["task"], model="mlp", batch=b, evals=EVALS, **v)
            cfg.pop("warmup_epochs")  # budgets are in steps: the warmup is a share of the budget
            if v["optimizer"] != "neumann":
                cfg["warmup_frac"] = WARMUP_FRAC
            elif s.quick:  # a 1-epoch burn-in: the quick budgets reach the Neumann phase
                cfg["burn_in_epochs"] = 1
            guess = centre * math.sqrt(b / 256)
            top = max_budget(st, b, train_size)
            searches.append(_Search(f"{name}/{b}", cfg, guess, min(start_budget(st, b), top), top))
    runs = run_searches(runner, searches, st, "critical-batch")
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
        meta={
            **st,
            "variants": VARIANTS,
            "seeds": SEEDS,
            "warmup_frac": WARMUP_FRAC,
            "evals": EVALS,
            "probe_batch": probe_batch,
            **({"neumann_burn_in_epochs": 1} if s.quick else {}),
        },
        runs=flat,
    )
    return finish(runner, s, payload, render_critical_batch)


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
    seeds: tuple[int, ...] = DEFAULT_SEEDS,
    metrics: dict[str, str] | None = None,
) -> dict[str, dict[int, CellResult]]:
    """Every ``variant/batch`` cell's :class:`CellResult` (``metrics``: the curve each variant is read from)."""
    out: dict[str, dict[int, CellResult]] = {}
    for name in variants:
        for b in batches:
            if f"{name}/{b}" in cells:
                metric = (metrics or {}).get(name, "val_error")
                out.setdefault(name, {})[b] = cell_result(cells[f"{name}/{b}"], target, seeds, metric)
    return out


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
        "Every point tuned: budgets of steps on a ladder of powers of 2 (none longer than "
        f"{meta.get('max_epochs', 512)} epochs), at each budget the learning rate tuned on the "
        f"1-3-10 grid (seed 0), then {plural(meta['seeds'], 'seed')} at the chosen rate; a budget reaches the target "
        "when the seeds' mean validation error does, at one of "
        f"{meta['evals']} evaluation points. Steps-to-target: the first such point in the smallest reaching budget "
        "(the budget below was tried and did not reach, where marked ✓). Every budget decays the rate to 0 by "
        f"cosine; baselines warm up over its first {100 * meta['warmup_frac']:.0f}%. Neumann keeps "
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
        "| optimizer | " + " | ".join(f"batch {b}" for b in batches) + " | critical batch |",
        "|---|" + "---|" * (len(batches) + 1),
    ]
    summary: dict[str, Any] = {}
    for name, per_b in results.items():
        row, steps = [], {}
        for b in batches:
            r = per_b.get(b)
            s = r.smallest if r else None
            if s is None:
                top = max(r.budgets) if r and r.budgets else 0
                row.append(f"not reached in {top:,} steps ({top * b / max(train_size, 1):,.0f} epochs)" if r else "—")
                continue
            steps[b] = float(s.first_hit)  # type: ignore[arg-type]
            mark = " ✓" if r.verified(meta["first_budget"]) else ""  # type: ignore[union-attr]
            row.append(f"{s.first_hit:,} (budget {s.steps:,} steps, lr {s.lr:g}{'' if s.interior else ', edge'}){mark}")
        crit = critical_batch_size(steps)
        summary[name] = dict(steps={str(b): v for b, v in steps.items()}, critical=crit, noise_scale=noise.get(name))
        lines.append(f"| {LABELS[name]} | " + " | ".join(row) + f" | {crit if crit else '—'} |")
    lines += [
        "\nCritical batch: the largest batch B whose examples to the target, S(B) x B, are at most twice the "
        "fewest at any batch up to B (at least half the ideal speed-up from the most efficient smaller batch), "
        "among the batches up to the first that fails; under perfect scaling S(B) x B stays constant.\n",
        f"Gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018), measured along each "
        f"optimizer's tuned run at batch {meta['probe_batch']} (seed 0), at the evaluation points on the way to the "
        f"target (validation error above {target:g}% and at most {2 * target:g}%), from unbiased estimators (8 batches "
        "of 32 and one of 2,048 at each point) whose numerators and denominators are averaged separately. Past the "
        "target the training loss is near 0, both estimates fall to their noise and the ratio means nothing; the "
        "right-hand plot shows each point's estimate along the run.\n",
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
        bs = [b for b in batches if per_b.get(b) and per_b[b].smallest is not None]
        ys = [per_b[b].smallest.first_hit for b in bs]  # type: ignore[union-attr]
        if bs:
            # markers apart and lines a little thicker below: rows that coincide (AdamW, LAMB) stay visible
            k = list(results).index(name)
            ax.plot(bs, ys, label=LABELS[name], lw=1 + 0.4 * (len(results) - k), ms=4 + len(results) - k, **style(name))
    ref = [(b, r.smallest.first_hit or 0) for per in results.values() for b, r in per.items() if r.smallest]
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
    fewer = []
    for base in BASELINES:
        other = summ.get(base)
        if not other:
            continue
        wins = [b for b, s in neu["steps"].items() if s < other["steps"].get(b, float("inf"))]
        fewer.append(f"{LABELS[base]} at {', '.join(wins) if wins else 'no batch size'}")
    return out + ". Neumann (default) reaches the target in fewer steps than " + "; ".join(fewer)
