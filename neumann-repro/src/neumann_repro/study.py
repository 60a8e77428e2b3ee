"""What a study is: its entry in the registry, the settings it runs under, its configs and how it
writes its results.

A study is one module under ``neumann_repro.studies`` that declares one :class:`Study`: a ``run``
that trains (through the runner's cache) and returns its table after writing a *payload*
(``{"study", "meta", "runs"}``, the data), a ``render`` that turns a payload into a table, a
summary and plots without training, and a ``verdict`` that reads the summary. ``neumann-repro
report`` runs only the renderers, on the committed payloads in ``docs/results/``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .plotting import QUICK_NOTE, quick_run
from .runner import Runner

Payload = dict[str, Any]
Rendered = tuple[str, dict[str, Any]]  # (markdown table, summary the verdict reads)


@dataclass(frozen=True)
class Study:
    """A study's one entry in the registry (``neumann_repro.registry``)."""

    name: str  # the subcommand, and the results file docs/results/NAME.json
    help: str  # what it runs (and what --quick runs instead)
    full_cost_core_minutes: int | None  # training time of the committed full results, by the runs' clocks
    claim: tuple[str, str]  # (where in the paper, what the paper claims)
    run: Callable[[Runner, Settings], str]
    render: Callable[[Payload, Path], Rendered]
    verdict: Callable[[dict[str, Any]], str]
    # command-line options of the training studies that this one does not read (left off its help)
    unused_options: tuple[str, ...] = ()


@dataclass
class Settings:
    quick: bool
    seeds: int | None = None  # final seeds at the chosen setting; None: the study's default
    task4k: str = "mnist1d-4k"
    task_large: str = "mnist1d-36k"  # batch-scaling and compare's second task
    epochs: int | None = None  # overrides every study's epoch budget (tests, smoke runs)
    schedule: str = "cosine"  # the learning-rate schedule of every run (train.SCHEDULES)

    def budget(self, quick: int, full: int) -> int:
        return self.epochs if self.epochs is not None else (quick if self.quick else full)

    def n_seeds(self, quick: int, full: int) -> int:
        return self.seeds if self.seeds is not None else (quick if self.quick else full)

    def note(self) -> str | None:
        """What a result of these settings must say about itself (``None``: the documented ones)."""
        if self.quick:
            return QUICK_NOTE
        if not self.is_full:
            return "custom settings (--epochs or --schedule): not the documented result"
        return None

    @property
    def is_full(self) -> bool:
        """The documented settings: what ``docs/results/`` holds (the regularizers study sets its
        schedules per cell; the others are documented with cosine decay)."""
        return not self.quick and self.epochs is None and self.schedule == "cosine"

    def scheduled(self, cfg: dict[str, Any], warmup_epochs: int = 5) -> dict[str, Any]:
        """``cfg`` under this run's schedule: with ``"paper"`` every optimizer, Neumann included,
        ramps up over ``warmup_epochs`` (at most half the budget) and then decays in steps."""
        cfg = {**cfg, "schedule": self.schedule}
        if self.schedule == "paper":
            cfg["warmup_epochs"] = min(warmup_epochs, cfg["epochs"] // 2)
        return cfg


def base_cfg(**kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(warmup_epochs=0)
    cfg.update(kw)
    return cfg


def finish(runner: Runner, s: Settings, payload: Payload, render: Callable[[Payload, Path], Rendered]) -> str:
    """Render the payload into ``OUT/STUDY`` (results.json, table.md, PNGs); with the documented
    settings also write it to the runner's results directory (``docs/results/STUDY.json``). Other
    settings say so in the table, the figures' titles and the results' meta."""
    study = payload["study"]
    study_dir = runner.out / study
    study_dir.mkdir(parents=True, exist_ok=True)
    note = s.note()
    if note is not None:
        payload = {**payload, "meta": {**payload.get("meta", {}), "note": note}}
    table, summary = render_payload(render, payload, study_dir)
    (study_dir / "results.json").write_text(json.dumps({**payload, "summary": summary}, indent=1))
    (study_dir / "table.md").write_text(table)
    if s.is_full and runner.results_dir is not None:
        runner.results_dir.mkdir(parents=True, exist_ok=True)
        (runner.results_dir / f"{study}.json").write_text(json.dumps(payload, indent=1) + "\n")
    return table


def render_payload(render: Callable[[Payload, Path], Rendered], payload: Payload, out_dir: Path) -> Rendered:
    """``render(payload, out_dir)``, with the payload's note (a quick smoke run) under the table's
    title and in every figure's title."""
    note = payload.get("meta", {}).get("note")
    with quick_run(note is not None):
        table, summary = render(payload, out_dir)
    if note is not None:
        title, _, rest = table.partition("\n")
        table = f"{title}\n\n**{note}** (the documented results: docs/REPRODUCTION.md)\n{rest}"
    return table, summary


def cells_of(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        out.setdefault(r["cell"], []).append(r)
    return out
