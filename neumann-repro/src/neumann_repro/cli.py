"""neumann-repro: the reproduction studies of the Neumann optimizer on MNIST-1D.

Run one study (e.g. 'neumann-repro compare --quick'), or 'all'. Full studies (without --quick or
--epochs) write their runs to --results (docs/results/); 'report' turns those files into
docs/REPRODUCTION.md and its plots without training. Every finished run is cached under
--out/cache, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .registry import studies as registered_studies
from .report import has_results, write_report
from .runner import Runner
from .study import Settings, Study
from .tasks import MNIST1D_SIZES
from .train import SCHEDULES


def _full_cost(study: Study | None) -> str:
    minutes = study.full_cost_core_minutes if study is not None else None
    if minutes is None:
        return ""
    parallel = ""
    if study is not None and "jobs" not in study.unused_options:
        parallel = f" (about {max(1, round(minutes / 2))} min with --jobs 2)"
    return (
        f" A full run trains for about {minutes} min on one core{parallel}; nothing is trained where docs/results "
        "already holds the runs."
    )


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad input with one line (``neumann-repro: error: ...``, exit status 2) before any work."""
    import torch

    from .tasks import cifar10_missing

    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs must be a positive number of epochs, got {args.epochs}")
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.seeds is not None and args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device!r} is not a device torch knows ({e})")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this machine has no CUDA device torch can use; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: only cpu and cuda are supported")
    if args.task is not None:
        if args.task == "cifar10":
            if args.data_dir is None:
                p.error("--task cifar10 needs --data-dir DIR with the CIFAR-10 python batches (never downloaded)")
            missing = cifar10_missing(args.data_dir)
            if missing:
                p.error(f"--data-dir {args.data_dir}: CIFAR-10 python batches not found ({missing})")
    elif args.data_dir is not None:
        p.error("--data-dir is only read with --task cifar10")


def _all_hours() -> float:
    """Every study's full cost from scratch, in hours of wall time with two cores."""
    return sum(s.full_cost_core_minutes or 0 for s in registered_studies().values()) / 2 / 60


# the two subcommands that are not studies (each study's help is in its entry)
COMMAND_HELP = {
    "all": f"Every study in turn, then the report (about {_all_hours():.0f} hours with two cores from scratch; "
    "resumable).",
    "report": "Re-render docs/REPRODUCTION.md and its plots from the committed results, without training.",
}


def _verdict(study: Study, results: Path, settings: Settings) -> str:
    """The study's rule-based verdict on what it just wrote (the report's, for these runs)."""
    summary = json.loads(results.read_text()).get("summary", {}) if results.is_file() else {}
    note = settings.note()
    return f"[verdict (rule-based{'; ' + note if note else ''}): {study.verdict(summary)}]"


def _served(name: str, served: dict[str, int], args: argparse.Namespace) -> str:
    """Where a study's runs came from, and how to train them afresh when none was trained."""
    trained, cache, committed = served["trained"], served["cache"], served["committed"]
    line = f"[{name}: {trained} runs trained, {cache} from the run cache ({args.out / 'cache'})"
    line += f", {committed} from the committed results ({args.results})]"
    if trained == 0 and committed:
        line += (
            f"\n[nothing was trained: the table above renders the committed results; to train them again, "
            f"run with an empty results directory and run cache, e.g. --results {args.out / 'fresh-results'} "
            f"--out {args.out / 'fresh'}]"
        )
    return line


def _check_writable(p: argparse.ArgumentParser, flag: str, path: Path, is_dir: bool) -> None:
    """Fail with one line when ``path`` (a directory, or a file's parent) cannot be written."""
    target = path if is_dir else path.parent
    if is_dir and path.exists() and not path.is_dir():
        p.error(f"{flag} {path}: exists and is not a directory")
    if not is_dir and path.is_dir():
        p.error(f"{flag} {path}: is a directory; give a file name")
    probe_from = target
    while not probe_from.exists():
        probe_from = probe_from.parent
    if not probe_from.is_dir():
        p.error(f"{flag} {path}: {probe_from} is not a directory")
    if not os.access(probe_from, os.W_OK | os.X_OK):
        p.error(f"{flag} {path}: {probe_from} is not writable")
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as e:
        p.error(f"{flag} {path}: cannot write there ({e.strerror or e})")


def _parser(studies: dict[str, Study]) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one subparser per study, each with only the options it reads."""
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--out", type=Path, default=Path("runs"), help="output directory and run cache (default: runs/)")
    where.add_argument(
        "--results",
        type=Path,
        default=Path("docs/results"),
        help="committed results of the full studies: read as a cache, written by full runs, read by 'report' "
        "(default: docs/results)",
    )
    quick = argparse.ArgumentParser(add_help=False)
    quick.add_argument(
        "--quick", action="store_true", help="a quick smoke run (at most about a minute; not the documented result)"
    )
    report_quick = argparse.ArgumentParser(add_help=False)
    report_quick.add_argument(
        "--quick", action="store_true", help="render the quick runs under --out instead of the committed results"
    )
    report = argparse.ArgumentParser(add_help=False)
    report.add_argument(
        "--report",
        type=Path,
        default=Path("docs/REPRODUCTION.md"),
        help="where the reproduction report is written (default: docs/REPRODUCTION.md)",
    )
    p = argparse.ArgumentParser(
        prog="neumann-repro",
        description=__doc__,
        epilog="'neumann-repro STUDY --help' says what a study runs and how long.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="study", required=True, metavar="STUDY", title="studies")
    subs = {}
    for name in [*studies, "all", "report"]:
        parents = (
            [where, report_quick, report] if name == "report" else [where, quick] + ([report] if name == "all" else [])
        )
        entry = studies.get(name)
        text = entry.help if entry is not None else COMMAND_HELP[name]
        # (a help string is %-formatted by argparse, a description is not)
        subs[name] = sub.add_parser(
            name, parents=parents, help=text.replace("%", "%%"), description=text + _full_cost(entry)
        )
        if name != "report":
            _training_options(subs[name], skip=entry.unused_options if entry is not None else ())
    return p, subs


def _training_options(p: argparse.ArgumentParser, skip: tuple[str, ...]) -> None:
    """What a study trains and how: the options it reads (``skip``: those its entry says it does not)."""
    cores = os.cpu_count() or 1
    options: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
        "epochs": (
            ("--epochs",),
            dict(type=int, default=None, help="override every run's epoch budget (default: the study's own)"),
        ),
        "schedule": (
            ("--schedule",),
            dict(
                choices=SCHEDULES,
                default="cosine",
                help="learning-rate schedule of every run: cosine decay to 0 (default, the documented results), "
                "or the paper's (linear ramp over 5 epochs, then x0.3 every fifth of the budget)",
            ),
        ),
        "seeds": (("--seeds",), dict(type=int, default=None, help="seeds at the chosen setting (default: per study)")),
        "device": (("--device",), dict(default="cpu", help="cpu or cuda (default: cpu)")),
        "jobs": (
            ("--jobs",),
            dict(type=int, default=cores, help=f"runs trained at once, one core each (default: the {cores} cores)"),
        ),
        "no_progress": (("--no-progress",), dict(action="store_true", help="no progress bars")),
        "task": (
            ("--task",),
            dict(
                default=None,
                choices=[*MNIST1D_SIZES, "cifar10"],
                help="replace the MNIST-1D set of every run (4k and 36k alike); cifar10 needs --data-dir "
                "(default: each study's own sets)",
            ),
        ),
        "data_dir": (
            ("--data-dir",),
            dict(type=Path, default=None, help="CIFAR-10 python-pickle directory (with --task cifar10)"),
        ),
    }
    for name, (flags, kwargs) in options.items():
        if name not in skip:
            p.add_argument(*flags, **kwargs)


# what a subcommand without the option (report has no training options, studies no --report) reads
ABSENT_OPTIONS = dict(
    seeds=None,
    device="cpu",
    jobs=1,
    no_progress=False,
    task=None,
    data_dir=None,
    report=Path("docs/REPRODUCTION.md"),
    epochs=None,
    schedule="cosine",
)


def main(argv: list[str] | None = None) -> int:
    studies = registered_studies()
    top, subs = _parser(studies)
    args, unknown = top.parse_known_args(argv)
    if unknown:  # in the study's own words: its usage line, not the top-level one
        subs[args.study].error(f"unrecognized arguments: {' '.join(unknown)}")
    for name, default in ABSENT_OPTIONS.items():
        args.__dict__.setdefault(name, default)
    try:
        return _main(args, subs[args.study], studies)  # errors show the study's own usage line
    except KeyboardInterrupt:
        print(
            f"neumann-repro: interrupted; finished runs are kept in the cache ({args.out / 'cache'}): "
            "the same command resumes there",
            file=sys.stderr,
        )
        return 130


def _main(args: argparse.Namespace, p: argparse.ArgumentParser, studies: dict[str, Study]) -> int:
    _check(p, args)
    settings = Settings(quick=args.quick, seeds=args.seeds, epochs=args.epochs, schedule=args.schedule)
    if args.task:
        settings.task4k = settings.task_large = args.task
    writes_report = args.study in ("all", "report")
    source = "runs" if not settings.is_full else "results"
    source_dir = args.out if source == "runs" else args.results
    if args.study == "report" and not has_results(source_dir, source):
        where = f"--out {args.out} (quick runs)" if source == "runs" else f"--results {args.results}"
        p.error(f"no study results in {where}: run a study first (e.g. 'neumann-repro compare --quick')")
    if args.study != "report":
        _check_writable(p, "--out", args.out, is_dir=True)
    if writes_report:
        _check_writable(p, "--report", args.report, is_dir=False)
    names = list(studies) if args.study == "all" else ([] if args.study == "report" else [args.study])
    if names:
        runner = Runner(
            args.out,
            device=args.device,
            data_dir=args.data_dir,
            progress=not args.no_progress,
            results_dir=args.results,
            jobs=args.jobs,
        )
        try:
            for name in names:
                t0 = time.perf_counter()
                before = {k: set(v) for k, v in runner.served.items()}
                table = studies[name].run(runner, settings)
                print(table)
                print(f"[{name}: {time.perf_counter() - t0:.0f} s; results in {args.out / name}]", flush=True)
                served = {k: len(runner.served[k] - before[k]) for k in before}
                if any(served.values()):
                    print(_served(name, served, args), flush=True)
                print(_verdict(studies[name], args.out / name / "results.json", settings), flush=True)
        finally:
            runner.close()
    if writes_report:
        notes = args.results.parent / "reproduction_notes.md"
        write_report(source_dir, args.report, settings, source, notes=notes)
        print(f"[report written to {args.report}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
