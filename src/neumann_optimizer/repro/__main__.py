"""``neumann-repro STUDY [--quick] [--out DIR] [--seeds N] [--device cpu|cuda] [--data-dir DIR]``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .report import write_report
from .runner import Runner
from .studies import STUDIES, Settings

ALL_ORDER = ["compare", "seeds", "ablation", "batch-scaling", "curvature"]


def _studies() -> dict:
    from .curvature import curvature

    return {**STUDIES, "curvature": curvature}


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
    p.add_argument("--seeds", type=int, default=None, help="seeds per config (default: 1 quick, 3 full)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--data-dir", type=Path, default=None, help="CIFAR-10 python-pickle directory (optional)")
    p.add_argument("--task", default=None, help="override the 4k task (e.g. cifar10 with --data-dir)")
    p.add_argument(
        "--report",
        type=Path,
        default=Path("docs/REPRODUCTION.md"),
        help="where 'all' and 'report' write the reproduction report",
    )
    p.add_argument("--epochs", type=int, default=None, help="override every study's epoch budget")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    settings = Settings(quick=args.quick, seeds=seeds, epochs=args.epochs)
    if args.task:
        settings.task4k = settings.task80k = args.task
    runner = Runner(args.out, device=args.device, data_dir=args.data_dir, progress=not args.no_progress)
    names = ALL_ORDER if args.study == "all" else ([] if args.study == "report" else [args.study])
    for name in names:
        t0 = time.perf_counter()
        table = studies[name](runner, settings)
        print(table)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s; results in {args.out / name}]", flush=True)
    if args.study in ("all", "report"):
        write_report(args.out, args.report, settings)
        print(f"[report written to {args.report}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
