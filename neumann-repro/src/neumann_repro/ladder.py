"""Steps to a target, by a protocol whose reporting seeds choose nothing (docs/REPRODUCTION.md,
"The ladder protocol"). Shared by critical-batch and ingredients.

A *cell* is one optimizer (or variant) at one batch size. Its search, on the **tuning seeds** (0 and 1)
alone:

1. **Budgets** lie on a ladder of powers of 2 (``first_budget * 2**k`` steps); every budget decays the
   rate to 0 by cosine at its end.
2. **At a budget**, learning rates come from the fine grid (4 points per decade: ..., 0.1, 0.18, 0.32,
   0.56, 1, 1.8, ...), starting from 3 rates around a guess. A rate's score is its **worse tuning
   seed**: the later first evaluation step at the target (a miss or a divergence on either seed is
   never), then the higher final validation error. The chosen rate has the best score (ties: the
   smaller rate); while it is not strictly inside the rates tried, the grid grows by one rate beyond
   that edge. A rate one of whose seeds diverges can therefore not be chosen while a rate that reaches
   on both exists.
3. **A budget reaches** the target when both tuning seeds reach it at the chosen rate. The search walks
   up the ladder until a budget reaches and down until one does not; the cell's budget is its smallest
   reaching one (verified: the budget below was tried and did not reach, or there is none).
4. **Reporting seeds** (2, 3, ...: ``report_seeds`` of them, disjoint from the tuning seeds) then run at
   that budget and rate. Each reports its own first evaluation step at the target, or a **miss**
   (censored: it did not reach within the budget); nothing is imputed. ``verdicts.rank_compare``
   compares two cells' reporting seeds with misses tied last.

Every decision is a pure function of the runs (:func:`cell_result`), so a study resumes through the
run cache and the report recomputes every choice from the committed results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .runner import Runner, config_key
from .runs import CHANCE_ERROR

TUNE_SEEDS = (0, 1)
REPORT_SEEDS = 8  # reporting seeds per cell: 2..9
START_POINTS = 3  # rates tried first at a budget, centred on the guess
MAX_EXTENSIONS = 6  # grid extensions per budget
PER_DECADE = 4


def lr_at(i: int) -> float:
    """The ``i``-th rate of the fine grid, 2 significant digits: 1, 1.8, 3.2, 5.6, 10, ..."""
    return float(f"{10 ** (i / PER_DECADE):.2g}")


def lr_index(lr: float) -> int:
    """The fine grid's index nearest ``lr``."""
    return round(PER_DECADE * math.log10(lr))


def report_seeds(n: int = REPORT_SEEDS) -> tuple[int, ...]:
    return tuple(range(len(TUNE_SEEDS), len(TUNE_SEEDS) + n))


def curve(run: dict[str, Any], metric: str = "val_error") -> list[tuple[int, float]]:
    """(step, error) of a run; a diverged run counts as chance from where it stopped."""
    pts = [(h["step"], h[metric] if math.isfinite(h[metric]) else CHANCE_ERROR) for h in run["history"]]
    if run["diverged"] or not pts:
        pts.append((run["config"]["steps"], CHANCE_ERROR))
    return pts


def first_hit(run: dict[str, Any], target: float, metric: str = "val_error") -> int | None:
    """The first evaluation step at or below the target; ``None`` if the run misses (or diverged first)."""
    for step, err in curve(run, metric):
        if err <= target:
            return step
    return None


def score(run: dict[str, Any], target: float, metric: str = "val_error") -> tuple[float, float]:
    """(first step at the target, inf if never; final error): lower is better."""
    hit = first_hit(run, target, metric)
    return (hit if hit is not None else math.inf, curve(run, metric)[-1][1])


@dataclass
class Budget:
    """One budget of a cell: the rates tried (each with its worse tuning seed's score), the choice,
    and the reporting seeds' outcome at the choice."""

    steps: int
    scores: dict[float, tuple[float, float]]
    diverged: dict[float, int]  # tuning seeds that diverged, per rate
    lr: float
    interior: bool
    complete: bool  # every tuning seed ran at every rate tried
    hits: dict[int, int | None] = field(default_factory=dict)  # reporting seed -> first step at the target

    @property
    def reached(self) -> bool:
        """Both tuning seeds reach the target at the chosen rate."""
        return math.isfinite(self.scores[self.lr][0])

    def next_up(self) -> str:
        """What the next rate up did (the cliff's edge, said): "1.8: diverged", "3.2: missed"."""
        up = [lr for lr in sorted(self.scores) if lr > self.lr]
        if not up:
            return "none tried above"
        lr = up[0]
        if self.diverged.get(lr):
            return f"{lr:g} diverged ({self.diverged[lr]} of {len(TUNE_SEEDS)} tuning seeds)"
        hit = self.scores[lr][0]
        return f"{lr:g} reached at {hit:,.0f}" if math.isfinite(hit) else f"{lr:g} missed"

    @property
    def report(self) -> list[float]:
        """Reporting seeds' steps to the target, a miss as ``inf`` (censored)."""
        return [math.inf if h is None else float(h) for _, h in sorted(self.hits.items())]

    @property
    def n_reached(self) -> int:
        return sum(h is not None for h in self.hits.values())


def budget_result(runs: list[dict[str, Any]], target: float, metric: str = "val_error") -> Budget:
    """The choice at one budget from its runs (pure)."""
    per: dict[float, dict[int, dict[str, Any]]] = {}
    for r in runs:
        per.setdefault(float(r["config"]["lr"]), {})[r["config"]["seed"]] = r
    tuned = {lr: rs for lr, rs in per.items() if any(s in rs for s in TUNE_SEEDS)}
    scores = {lr: max(score(rs[s], target, metric) for s in TUNE_SEEDS if s in rs) for lr, rs in tuned.items()}
    diverged = {lr: sum(bool(rs[s]["diverged"]) for s in TUNE_SEEDS if s in rs) for lr, rs in tuned.items()}
    best = min(scores, key=lambda lr: (*scores[lr], lr))
    lrs = sorted(scores)
    b = Budget(
        steps=int(runs[0]["config"]["steps"]),
        scores=scores,
        diverged=diverged,
        lr=best,
        interior=len(lrs) >= 3 and lrs[0] < best < lrs[-1],
        complete=all(all(s in rs for s in TUNE_SEEDS) for rs in tuned.values()),
    )
    b.hits = {s: first_hit(r, target, metric) for s, r in per.get(best, {}).items() if s not in TUNE_SEEDS}
    return b


@dataclass
class CellResult:
    budgets: dict[int, Budget] = field(default_factory=dict)

    @property
    def smallest(self) -> Budget | None:
        """The smallest budget whose tuning seeds both reach the target at its chosen rate."""
        reached = [b for _, b in sorted(self.budgets.items()) if b.reached]
        return reached[0] if reached else None

    def verified(self, first_budget: int) -> bool:
        """The budget below the smallest reaching one was tried and did not reach (or there is none)."""
        s = self.smallest
        if s is None:
            return False
        below = self.budgets.get(s.steps // 2)
        return s.steps <= first_budget or (below is not None and below.complete and not below.reached)

    @property
    def report(self) -> list[float]:
        """The reporting seeds' steps to the target in the smallest reaching budget (misses: inf)."""
        s = self.smallest
        return s.report if s is not None else []


def cell_result(runs: list[dict[str, Any]], target: float, metric: str = "val_error") -> CellResult:
    by_budget: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        by_budget.setdefault(int(r["config"]["steps"]), []).append(r)
    return CellResult({s: budget_result(rs, target, metric) for s, rs in sorted(by_budget.items())})


# ---------------------------------------------------------------- the search
@dataclass
class Search:
    """One cell's walk along the budget ladder for one target (resumable: every decision is a
    function of runs). Searches of several targets over the same configs share runs by the cache."""

    name: str
    base: dict[str, Any]
    centre: float
    budget: int
    first_budget: int
    max_budget: int
    target: float
    metric: str = "val_error"  # the curve that is searched (a run record's history key)
    n_report: int = REPORT_SEEDS
    tried: dict[int, set[int]] = field(default_factory=dict)  # budget -> grid indices of rates
    extensions: dict[int, int] = field(default_factory=dict)
    done: bool = False

    def cfg(self, steps: int, lr: float, seed: int) -> dict[str, Any]:
        return {**self.base, "steps": steps, "lr": lr, "seed": seed}

    def plan(self, runs: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """The configs this cell needs next (empty when it is done), advancing its state."""
        while not self.done:
            steps = self.budget
            if steps not in self.tried:
                centre = self.centre
                near = [s for s in self.tried if s in runs]
                if near:  # start from the choice at the nearest budget tried
                    nearest = min(near, key=lambda s: abs(math.log2(s / steps)))
                    centre = budget_result(runs[nearest], self.target, self.metric).lr
                i = lr_index(centre)
                self.tried[steps] = set(range(i - START_POINTS // 2, i - START_POINTS // 2 + START_POINTS))
                self.extensions[steps] = 0
            have = {(float(r["config"]["lr"]), r["config"]["seed"]) for r in runs.get(steps, [])}
            need = [
                self.cfg(steps, lr_at(i), s)
                for i in sorted(self.tried[steps])
                for s in TUNE_SEEDS
                if (lr_at(i), s) not in have
            ]
            if need:
                return need
            b = budget_result(runs[steps], self.target, self.metric)
            if not b.interior and self.extensions[steps] < MAX_EXTENSIONS:
                i, idx = lr_index(b.lr), self.tried[steps]
                idx.add(i - 1 if i == min(idx) else i + 1)
                self.extensions[steps] += 1
                continue
            result = cell_result([r for rs in runs.values() for r in rs], self.target, self.metric)
            if b.reached and not result.verified(self.first_budget):
                self.budget = steps // 2
                continue
            above = result.budgets.get(steps * 2)
            if not b.reached and steps < self.max_budget and not (above is not None and above.reached):
                self.budget = steps * 2
                continue
            self.done = True
            best = result.smallest
            if best is not None:
                need = [
                    self.cfg(best.steps, best.lr, s)
                    for s in report_seeds(self.n_report)
                    if (best.lr, s) not in {(float(r["config"]["lr"]), r["config"]["seed"]) for r in runs[best.steps]}
                ]
                return need
        return []


def run_searches(runner: Runner, searches: list[Search], study: str) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """Walk every cell's ladder in rounds (each round's runs trained together, through the cache):
    each cell's runs by budget, tagged with ``"cell"``."""
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {x.name: {} for x in searches}
    round_ = 0
    while True:
        plan = [(x, c) for x in searches for c in x.plan(runs[x.name])]
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
