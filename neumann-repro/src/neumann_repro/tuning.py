"""One learning-rate tuning protocol for every optimizer (docs/REPRODUCTION.md, "Tuning protocol").

Learning rates live on one log grid, ``1, 3, 10, 30, ...`` times a power of ten (index ``i``: mantissa
1 for even ``i``, 3 for odd ``i``, exponent ``i // 2``), so every optimizer is searched at the same
resolution. A *cell* (one optimizer at one batch size, task and budget) starts from ``points``
consecutive grid rates centred on a guess; each rate is trained with ``tune_seeds`` seeds. The chosen
rate is the one with the lowest mean final validation error (ties: the smaller rate). While the chosen
rate sits on an edge of the rates tried, the grid is extended by one rate beyond that edge (at most
``max_extensions`` times). Then the chosen rate is trained with ``final_seeds`` seeds, and test errors
are reported for those runs. :func:`choose` is a pure function of the runs, so the report recomputes
every choice from the committed results without training.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from . import ladder
from .rates import failed
from .runner import Runner
from .runs import final, mean_std
from .tables import plural, spread


def lr_at(i: int, grid: str = "coarse") -> float:
    """The ``i``-th rate of the grid: coarse ..., 0.1, 0.3, 1, 3, 10, ...; fine (4 per decade, the
    ladder protocol's) ..., 0.1, 0.18, 0.32, 0.56, 1, 1.8, ..."""
    if grid == "fine":
        return ladder.lr_at(i)
    return float(f"{1 if i % 2 == 0 else 3}e{i // 2}")


def lr_index(lr: float, grid: str = "coarse") -> int:
    """The grid index nearest to ``lr`` (exact for grid rates)."""
    return ladder.lr_index(lr) if grid == "fine" else round(2 * math.log10(lr))


@dataclass(frozen=True)
class Protocol:
    points: int = 5
    tune_seeds: int = 1
    final_seeds: int = 3
    max_extensions: int = 6
    refine: bool = True  # then try the two geometric midpoints around the grid's choice
    grid: str = "coarse"  # "fine": 4 rates per decade (then no midpoints)
    score: str = "mean"  # "worse": a rate scores its worse tuning seed (a divergence on either counts)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def seeds_text(self) -> str:
        """The seeds a table reports, in words: "4 reporting seeds (2-5) at the chosen rate; test error (%)
        of those seeds, mean ± std" (a quick run without reporting seeds: the tuning seeds)."""
        n = self.final_seeds - self.tune_seeds
        if n < 1:
            n = min(self.final_seeds, self.tune_seeds)
            return f"the tuning seeds at the chosen rate (no reporting seeds); test error (%) of those, {spread(n)}"
        seeds = f"{self.tune_seeds}" if n == 1 else f"{self.tune_seeds}-{self.final_seeds - 1}"
        return f"{plural(n, 'reporting seed')} ({seeds}) at the chosen rate; test error (%) of those seeds, {spread(n)}"


# every tuned study's full protocol: the fine grid from a 3-point start, 2 tuning seeds scored by the
# worse, extended until the choice is strictly inside; with final_seeds = 6, 4 reporting seeds
FULL_PROTOCOL: dict[str, Any] = dict(points=3, tune_seeds=2, max_extensions=6, grid="fine", score="worse")


@dataclass
class Choice:
    lr: float
    scores: dict[float, float]  # mean final validation error per rate tried (tuning seeds)
    interior: bool  # strictly inside the rates tried

    @property
    def tried(self) -> list[float]:
        return sorted(self.scores)


def choose(runs: Sequence[dict[str, Any]], tune_seeds: int, score: str = "mean") -> Choice:
    """The rate with the lowest mean (``score="worse"``: highest) final validation error over the
    tuning seeds (pure). A failed run (diverged, or collapsed: ended at ``rates.FAILED_AT``% or worse)
    scores infinity, so a rate with one never wins over one without, and where every rate tried
    failed the choice is the smallest, on the grid's edge: the grid then grows downwards instead of
    choosing among collapses by their noise."""
    per_lr: dict[float, list[float]] = {}
    for r in runs:
        if r["config"]["seed"] < tune_seeds:
            per_lr.setdefault(float(r["config"]["lr"]), []).append(math.inf if failed(r) else final(r, "val_error"))
    if not per_lr:
        raise ValueError("no tuning runs to choose from")
    scores = {lr: (max(v) if score == "worse" else statistics.fmean(v)) for lr, v in per_lr.items()}
    best = min(scores, key=lambda lr: (scores[lr], lr))
    lrs = sorted(scores)
    return Choice(best, scores, len(lrs) >= 3 and lrs[0] < best < lrs[-1])


def midpoints(coarse: Choice) -> list[float]:
    """The geometric midpoints (2 significant digits) between the coarse grid's choice and its
    neighbours: the refinement step. Computed from grid rates only, so it is the same however
    often a study is resumed."""
    tried = coarse.tried
    i = tried.index(coarse.lr)
    out = []
    for j in (i - 1, i + 1):
        if 0 <= j < len(tried):
            out.append(float(f"{math.sqrt(tried[j] * coarse.lr):.2g}"))
    return out


def tune(
    runner: Runner,
    cells: dict[str, tuple[dict[str, Any], float]],
    protocol: Protocol,
    desc: str,
) -> dict[str, list[dict[str, Any]]]:
    """Tune every cell (name -> (config without lr and seed, centre guess)) by the protocol.

    Returns each cell's runs (tuning and final seeds), each tagged with ``"cell": name``. Rounds of
    runs go through the runner's cache, so an interrupted study resumes where it stopped.
    """
    half, g = protocol.points // 2, protocol.grid
    tried = {
        name: set(range(lr_index(c, g) - half, lr_index(c, g) - half + protocol.points))
        for name, (_, c) in cells.items()
    }
    extensions = dict.fromkeys(cells, 0)

    def cfg(name: str, lr: float, seed: int) -> dict[str, Any]:
        return {**cells[name][0], "lr": lr, "seed": seed}

    def run(plan: list[tuple[str, dict[str, Any]]], stage: str) -> dict[str, list[dict[str, Any]]]:
        results = runner.run_all([c for _, c in plan], f"{desc}: {stage}")
        out: dict[str, list[dict[str, Any]]] = {name: [] for name in cells}
        for (name, _), res in zip(plan, results, strict=True):
            out[name].append({"cell": name, **res})
        return out

    def grid_plan() -> list[tuple[str, dict[str, Any]]]:
        return [
            (n, cfg(n, lr_at(i, g), s)) for n in cells for i in sorted(tried[n]) for s in range(protocol.tune_seeds)
        ]

    round_ = 0
    while True:
        round_ += 1
        runs = run(grid_plan(), f"learning-rate grid, round {round_}")
        grown = False
        for name in cells:
            choice = choose(runs[name], protocol.tune_seeds, protocol.score)
            if choice.interior or extensions[name] >= protocol.max_extensions:
                continue
            i, lo, hi = lr_index(choice.lr, g), min(tried[name]), max(tried[name])
            tried[name].add(i - 1 if i == lo else hi + 1)
            extensions[name] += 1
            grown = True
        if not grown:
            break
    plan = grid_plan()
    if protocol.refine and g == "coarse":
        for name in cells:
            coarse = choose(runs[name], protocol.tune_seeds, protocol.score)
            if coarse.interior:
                plan += [(name, cfg(name, lr, s)) for lr in midpoints(coarse) for s in range(protocol.tune_seeds)]
        runs = run(plan, "rates between the best grid rates")
    for name in cells:
        best = choose(runs[name], protocol.tune_seeds, protocol.score).lr
        plan += [(name, cfg(name, best, s)) for s in range(protocol.tune_seeds, protocol.final_seeds)]
    return run(plan, "more seeds at the chosen rates")


def next_up(runs: Sequence[dict[str, Any]], tune_seeds: int, lr: float) -> str:
    """What the next rate above ``lr`` did on the tuning seeds: "1.8 diverged (1 of 2 tuning seeds)",
    "1.8: 7.9% validation error (worse seed)", or "none tried above"."""
    above = sorted(
        {float(r["config"]["lr"]) for r in runs if r["config"]["lr"] > lr and r["config"]["seed"] < tune_seeds}
    )
    if not above:
        return "none tried above"
    at = [r for r in runs if r["config"]["lr"] == above[0] and r["config"]["seed"] < tune_seeds]
    div = sum(bool(r["diverged"]) for r in at)
    if div:
        return f"{above[0]:g} diverged ({div} of {len(at)} tuning seed{'s' if len(at) != 1 else ''})"
    return f"{above[0]:g}: {max(final(r, 'val_error') for r in at):.2f}% validation error (worse tuning seed)"


def reported(runs: Sequence[dict[str, Any]], tune_seeds: int, final_seeds: int, lr: float) -> list[dict[str, Any]]:
    """The runs at ``lr`` of the reporting seeds (``tune_seeds`` to ``final_seeds - 1``), by seed: what a
    table's means, curves and verdicts use; where there are none (a quick run), the tuning seeds'."""
    at = sorted(
        (r for r in runs if r["config"]["lr"] == lr and r["config"]["seed"] < final_seeds),
        key=lambda r: r["config"]["seed"],
    )
    return [r for r in at if r["config"]["seed"] >= tune_seeds] or at


def summarize(runs: Sequence[dict[str, Any]], tune_seeds: int, final_seeds: int, score: str = "mean") -> dict[str, Any]:
    """A cell's choice and its test errors at the chosen rate over its reporting seeds (the final
    seeds that did not tune it: ``report``; where there are none, a quick run, over the tuning seeds)."""
    choice = choose(runs, tune_seeds, score)
    at = reported(runs, tune_seeds, final_seeds, choice.lr)
    report = [final(r, "test_error") for r in at if r["config"]["seed"] >= tune_seeds]
    test = [final(r, "test_error") for r in at]
    m, s = mean_std(test)
    return dict(
        lr=choice.lr,
        tried=choice.tried,
        interior=choice.interior,
        next_up=next_up(runs, tune_seeds, choice.lr),
        trials=sum(1 for r in runs if r["config"]["seed"] < tune_seeds),
        seeds=len(test),
        test_mean=m,
        test_std=s,
        test_min=min(test),
        test_max=max(test),
        steps=at[0]["steps"] if at else 0,
        neumann_steps=at[0].get("neumann_steps") if at else None,
        diverged=sum(r["diverged"] for r in at),
        # the test errors of the seeds that did not tune the rate: what a verdict compares (verdicts)
        report=report,
    )
