"""``neumann-repro STUDY [--quick] [--out DIR] [--results DIR] [--seeds N] [--device cpu|cuda] [--data-dir DIR]``.

Full studies (no ``--quick``, no ``--epochs``) write their runs to ``--results`` (``docs/results/``);
``report`` turns those files into docs/REPRODUCTION.md and its plots without training.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .report import write_report
from .runner import Runner
from .studies import STUDIES, Settings
from .train import SCHEDULES

ALL_ORDER = ["compare", "seeds", "ablation", "batch-scaling", "curvature", "regularizers"]


def _studies() -> dict:
    from .curvature import curvature
    from .regularizers import regularizers

    return {**STUDIES, "curvature": curvature, "regularizers": regularizers}


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad input with one line (``neumann-repro: error: ...``, exit status 2) before any work."""
    import torch

    from .tasks import MNIST1D_SIZES, cifar10_missing

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
        if args.task not in (*MNIST1D_SIZES, "cifar10"):
            p.error(f"--task {args.task!r} is unknown; choose from {[*MNIST1D_SIZES, 'cifar10']}")
        if args.task == "cifar10":
            if args.data_dir is None:
                p.error("--task cifar10 needs --data-dir DIR with the CIFAR-10 python batches (never downloaded)")
            missing = cifar10_missing(args.data_dir)
            if missing:
                p.error(f"--data-dir {args.data_dir}: CIFAR-10 python batches not found ({missing})")
    elif args.data_dir is not None:
        p.error("--data-dir is only read with --task cifar10")


def main(argv: list[str] | None = None) -> int:
    studies = _studies()
    p = argparse.ArgumentParser(prog="neumann-repro", description=__doc__)
    p.add_argument(
        "study",
        choices=[*studies, "all", "report"],
        help="which study to run; 'all' runs every study and regenerates docs/REPRODUCTION.md",
    )
    p.add_argument("--quick", action="store_true", help="a minute-scale version of the study")
    p.add_argument("--out", type=Path, default=Path("runs"), help="output directory (default: runs/)")
    p.add_argument(
        "--results",
        type=Path,
        default=Path("docs/results"),
        help="committed results of the full studies: read as a cache, written by full runs, read by 'report'",
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds at the chosen setting (default: per study)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--data-dir", type=Path, default=None, help="CIFAR-10 python-pickle directory (with --task)")
    p.add_argument("--task", default=None, help="override the 4k task (e.g. cifar10 with --data-dir)")
    p.add_argument(
        "--report",
        type=Path,
        default=Path("docs/REPRODUCTION.md"),
        help="where 'all' and 'report' write the reproduction report",
    )
    p.add_argument("--epochs", type=int, default=None, help="override every study's epoch budget")
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="cosine",
        help="learning-rate schedule of every run: cosine decay to 0 (default, the documented results), or the "
        "paper's (linear ramp over 5 epochs, then x0.3 every fifth of the budget); 'regularizers' sets its own",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, one core each (default: 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    _check(p, args)
    settings = Settings(quick=args.quick, seeds=args.seeds, epochs=args.epochs, schedule=args.schedule)
    if args.task:
        settings.task4k = settings.task_large = args.task
    runner = Runner(
        args.out,
        device=args.device,
        data_dir=args.data_dir,
        progress=not args.no_progress,
        results_dir=args.results,
        jobs=args.jobs,
    )
    names = ALL_ORDER if args.study == "all" else ([] if args.study == "report" else [args.study])
    for name in names:
        t0 = time.perf_counter()
        table = studies[name](runner, settings)
        print(table)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s; results in {args.out / name}]", flush=True)
    if args.study in ("all", "report"):
        source = "runs" if not settings.is_full else "results"
        write_report(args.out if source == "runs" else args.results, args.report, settings, source)
        print(f"[report written to {args.report}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
