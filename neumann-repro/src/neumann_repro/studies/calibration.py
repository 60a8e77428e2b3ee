"""calibration: A/A controls for the verdict rule (``neumann_repro.verdicts``).

In settings the studies use, one optimizer at one learning rate is trained with many seeds that no
other study uses. Any split of those seeds into two disjoint groups is a comparison of an optimizer
with itself (an A/A pair), so a rule that calls such a pair different makes a false positive. For
group sizes the studies report (2 to 5 seeds a side), :func:`false_positive_rates` draws random
disjoint splits and counts how often each rule, the old two-standard-error rule and Welch's t-test
at 5%, calls the two halves different. The splits share seeds, so the rates are less certain than
their number suggests: the table gives the rate's binomial standard error for as many splits as
there are independent ones (seeds / (2 x group size)) too.
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import Any

from ..plotting import pyplot, save_figure
from ..runner import Runner
from ..runs import final
from ..study import Payload, Rendered, Settings, Study, base_cfg, cells_of, finish
from ..verdicts import ALPHA, ERROR_MARGIN, error_contrast, rank_p, said_error, settle, two_se, welch_p


def _mlp(task: str, batch: int, epochs: int, lr: float, **optimizer: Any) -> dict[str, Any]:
    return dict(task=task, model="mlp", batch=batch, epochs=epochs, lr=lr, **optimizer)


DEFAULT = dict(optimizer="neumann", repulsive_weight=0.0)
WARMED = dict(warmup_epochs=5)  # batch-scaling's baselines warm up over 5 epochs
# name -> (config without seed, what it is): the rates the committed studies tuned for these cells
SETTINGS: dict[str, tuple[dict[str, Any], str]] = {
    "compare-4k": (
        _mlp("mnist1d-4k", 128, 40, 0.55, **DEFAULT),
        "Neumann (default), compare's 4k cell: batch 128, 40 epochs, lr 0.55",
    ),
    "compare-36k": (
        _mlp("mnist1d-36k", 128, 30, 0.55, **DEFAULT),
        "Neumann (default), compare's 36k cell: batch 128, 30 epochs, lr 0.55",
    ),
    "batch-scaling-1024": (
        _mlp("mnist1d-36k", 1024, 50, 1.7, **DEFAULT),
        "Neumann (default), batch-scaling's batch-1,024 cell: 50 epochs, lr 1.7",
    ),
    "batch-scaling-1024-sgd": (
        _mlp("mnist1d-36k", 1024, 50, 1.0, optimizer="sgd", **WARMED),
        "SGD+Nesterov, batch-scaling's batch-1,024 cell: 50 epochs, 5 warm-up epochs, lr 1.0",
    ),
    "batch-scaling-1024-lars": (
        _mlp("mnist1d-36k", 1024, 50, 17.0, optimizer="lars", **WARMED),
        "LARS, batch-scaling's batch-1,024 cell: 50 epochs, 5 warm-up epochs, lr 17",
    ),
}
# settings of one task and batch against each other: the fresh seeds also settle batch-scaling's
# verdicts at batch 1,024, which its own 2 reporting seeds a side cannot
PAIRS = (("batch-scaling-1024", "batch-scaling-1024-sgd"), ("batch-scaling-1024", "batch-scaling-1024-lars"))
FIRST_SEED = 1000  # seeds 1000, 1001, ...: no other study uses them
FULL_SEEDS, QUICK_SEEDS = 24, 6
GROUP_SIZES = (2, 3, 4, 5)  # seeds a side: batch-scaling's reporting seeds (2) to compare's (5)
SPLITS = 4000  # random disjoint splits per setting and group size


def calibration(runner: Runner, s: Settings) -> str:
    n = s.n_seeds(QUICK_SEEDS, FULL_SEEDS)
    chosen = {"compare-4k": SETTINGS["compare-4k"]} if s.quick else SETTINGS
    configs, cells = [], []
    for name, (cfg, _) in chosen.items():
        cfg = dict(cfg, epochs=s.budget(6, cfg["epochs"]))
        if s.quick and cfg["optimizer"] == "neumann":  # a 1-epoch burn-in: the quick runs reach the Neumann phase
            cfg["burn_in_epochs"] = 1
        for seed in range(FIRST_SEED, FIRST_SEED + n):
            configs.append(s.scheduled(base_cfg(**cfg, seed=seed)))
            cells.append(name)
    runs = runner.run_all(configs, "calibration: A/A seeds")
    payload = dict(
        study="calibration",
        meta=dict(settings={k: v[1] for k, v in chosen.items()}, seeds=n, first_seed=FIRST_SEED, splits=SPLITS),
        runs=[{"cell": c, **r} for c, r in zip(cells, runs, strict=True)],
    )
    return finish(runner, s, payload, render_calibration)


def false_positive_rates(values: list[float], size: int, splits: int, seed: int = 0) -> dict[str, float]:
    """The share of ``splits`` random disjoint ``size``-vs-``size`` splits of ``values`` that each
    rule calls different (pure; the same draws for every rule)."""
    rng = random.Random(seed)
    hits = {"two_se": 0, "welch": 0, "rank": 0}
    for _ in range(splits):
        pick = rng.sample(values, 2 * size)
        a, b = pick[:size], pick[size:]
        hits["two_se"] += two_se(a, b)
        p, q = welch_p(a, b), rank_p(a, b)
        hits["welch"] += p is not None and p < ALPHA
        hits["rank"] += q is not None and q < ALPHA
    return {k: v / splits for k, v in hits.items()}


def render_calibration(payload: Payload, out_dir: Path) -> Rendered:
    meta = payload["meta"]
    cells = cells_of(payload["runs"])
    lines = [
        "# calibration: A/A controls for the verdict rule\n",
        f"Each setting trains one optimizer at one rate with {meta['seeds']} seeds no other study uses "
        f"({meta['first_seed']} on). A random split of those seeds into two disjoint groups of n is an optimizer "
        f"against itself; the table gives the share of {meta['splits']:,} such splits that each rule calls "
        "different (final test error), for n = the reporting seeds a side the studies have. A calibrated rule "
        f"stays at or below {100 * ALPHA:.0f}%. ± is the binomial standard error for as many independent splits "
        "as the seeds allow (seeds / 2n): the splits share seeds.\n",
        "| setting | final test error, mean ± std (min-max) | n a side | old rule: beyond 2 SE "
        "| Welch's t-test, p < 5% (error verdicts) | exact rank test, p < 5% (steps verdicts) |",
        "|---|---|---|---|---|---|",
    ]
    summary: dict[str, Any] = {}
    rows = []
    for name, label in meta["settings"].items():
        vals = [final(r) for r in sorted(cells.get(name, []), key=lambda r: r["config"]["seed"])]
        if len(vals) < 4:
            continue
        m, sd = statistics.fmean(vals), statistics.stdev(vals)
        for n in [g for g in GROUP_SIZES if 2 * g <= len(vals)]:
            rates = false_positive_rates(vals, n, meta["splits"])
            indep = max(1, len(vals) // (2 * n))
            se = {k: (v * (1 - v) / indep) ** 0.5 for k, v in rates.items()}
            summary[f"{name}/{n}"] = {**rates, "independent_splits": indep}
            rows.append((name, n, rates))
            lines.append(
                f"| {label} | {m:.2f} ± {sd:.2f} ({min(vals):.2f}-{max(vals):.2f}) | {n} | "
                f"{100 * rates['two_se']:.1f}% ± {100 * se['two_se']:.0f} | {100 * rates['welch']:.1f}% ± "
                f"{100 * se['welch']:.0f} | {100 * rates['rank']:.1f}% ± {100 * se['rank']:.0f} |"
            )
    worst = {k: max((r[k] for _, _, r in rows), default=float("nan")) for k in ("two_se", "welch", "rank")}
    # pooled over the settings: the splits of different settings share no seed, so the pooled rate
    # rests on more independent splits than any one setting's (each setting's ± is wide)
    pooled = {
        str(n): {k: statistics.fmean(r[k] for _, m, r in rows if m == n) for k in ("two_se", "welch", "rank")}
        for n in GROUP_SIZES
        if any(m == n for _, m, _ in rows)
    }
    if pooled:
        lines += [
            "\nPooled over the settings (the mean of their rates):\n",
            "| n a side | old rule: beyond 2 SE | Welch's t-test, p < 5% | exact rank test, p < 5% |",
            "|---|---|---|---|",
            *(
                f"| {n} | {100 * r['two_se']:.1f}% | {100 * r['welch']:.1f}% | {100 * r['rank']:.1f}% |"
                for n, r in pooled.items()
            ),
            "\nA verdict now Holm-adjusts over its study's family, which can only lower these rates; with 2 "
            "seeds a side the rank test cannot reach 5% (its smallest p is 1/3).",
        ]
    pairs = [(a, b) for a, b in PAIRS if len(cells.get(a, [])) >= 2 and len(cells.get(b, [])) >= 2]
    settled: list[dict[str, Any]] = []
    if pairs:
        lines += [
            f"\nThe same fresh seeds settle verdicts of batch-scaling at batch 1,024 (its committed cells have 2 "
            f"reporting seeds a side), by the verdict rule, all {meta['seeds']} seeds a side:\n",
            "| setting | against | first minus second, points (positive: the first worse), Holm over these |",
            "|---|---|---|",
        ]
        contrasts = [error_contrast(*([final(r) for r in cells[x]] for x in pair)) for pair in pairs]
        settle(contrasts, ERROR_MARGIN)  # the family: these pairs
        for (a, b), c in zip(pairs, contrasts, strict=True):
            said = said_error(c, "the first")
            what = f"{meta['settings'][a].split(',')[0]} against {meta['settings'][b].split(',')[0]} at batch 1,024"
            settled.append(dict(what=what, verdict=said))
            lines.append(f"| {meta['settings'][a]} | {meta['settings'][b]} | {said} |")
    summary["worst"] = worst
    summary["pooled"] = pooled
    summary["settled"] = settled
    lines.append(
        f"\nLargest false-positive rate over the settings and group sizes: old rule {100 * worst['two_se']:.1f}%, "
        f"Welch's t-test {100 * worst['welch']:.1f}%, the exact rank test {100 * worst['rank']:.1f}%.\n"
    )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for k, name in enumerate(meta["settings"]):
        pts = [(n, r) for nm, n, r in rows if nm == name]
        if not pts:
            continue
        ns = [n + 0.04 * (k - 1.5) for n, _ in pts]
        ax.plot(ns, [100 * r["two_se"] for _, r in pts], "o--", color=f"C{k}", label=f"{name}: beyond 2 SE (old)")
        ax.plot(ns, [100 * r["welch"] for _, r in pts], "s-", color=f"C{k}", label=f"{name}: Welch p < 5%")
    ax.axhline(100 * ALPHA, color="gray", ls=":", lw=1, label="5%")
    ax.set(xlabel="seeds a side (n)", ylabel="A/A pairs called different (%)", title="calibration: false positives")
    ax.set_xticks(list(GROUP_SIZES))
    ax.legend(fontsize=6)
    save_figure(fig, out_dir / "calibration.png")
    return "\n".join(lines) + "\n", summary


def verdict(summ: dict[str, Any]) -> str:
    worst, pooled = summ.get("worst"), summ.get("pooled")
    if not worst or not pooled:
        return "no results"
    top = {k: max(r[k] for r in pooled.values()) for k in ("welch", "two_se", "rank")}
    ok = top["welch"] <= ALPHA and top["rank"] <= ALPHA
    out = (
        f"A/A false-positive rate pooled over the settings, at most: Welch's t-test {100 * top['welch']:.1f}% "
        f"(one setting at most {100 * worst['welch']:.1f}%), the exact rank test {100 * top['rank']:.1f}% "
        f"({100 * worst['rank']:.1f}%), the old two-standard-error rule "
        f"{100 * top['two_se']:.1f}% ({100 * worst['two_se']:.1f}%): the tests are "
        f"**{'calibrated' if ok else 'not calibrated'}** at 5%"
    )
    settled = [f"{v['what']}: {v['verdict']}" for v in summ.get("settled", [])]
    return out + ("; " + "; ".join(settled) if settled else "")


STUDY = Study(
    name="calibration",
    help=(
        "A/A controls for the verdict rule: the default against itself (and SGD+Nesterov and LARS against "
        "themselves) with 24 fresh seeds in five settings of compare and batch-scaling, and the false-positive "
        "rate of the old two-standard-error rule and of Welch's t-test over disjoint splits of 2-5 seeds a side "
        "(quick: 4k set, 6 epochs with a 1-epoch burn-in, 6 seeds)."
    ),
    full_cost_core_minutes=55,  # by the runs' clocks, with another study sharing the 2 cores (29 min wall)
    claim=(
        "no claim of the paper: the yardstick of every verdict",
        "nothing (this study checks the rule that judges the claims below: a rule that calls a difference "
        "between two optimizers real should call an optimizer different from itself at most 5% of the time).",
    ),
    run=calibration,
    render=render_calibration,
    verdict=verdict,
)
