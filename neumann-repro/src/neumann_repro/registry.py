"""Every study of the reproduction, in the order ``neumann-repro all`` runs them and the report
shows them. A study is a module under ``neumann_repro.studies`` that declares ``STUDY`` (a
:class:`~neumann_repro.study.Study`); adding one takes its module and one line here."""

from __future__ import annotations

from importlib import import_module

from .study import Study

MODULES = (
    "calibration",  # the yardstick of every verdict: first
    "compare",
    "batch_scaling",
    "ablation",
    "seeds",  # after compare: it reuses the rates compare tuned, when compare has run
    "curvature",
    "regularizers",
    "critical_batch",
    "ingredients",
    "cubic_weight",
    "tight_targets",
    "architectures",
)


def studies() -> dict[str, Study]:
    """The studies by name, in registry order."""
    entries = [import_module(f"{__package__}.studies.{m}").STUDY for m in MODULES]
    return {s.name: s for s in entries}
