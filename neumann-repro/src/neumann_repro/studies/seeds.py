"""seeds: the spread of final errors over seeds (the paper's Appendix C)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..optimizers import LABELS
from ..runner import Runner
from ..runs import by, final, mean_std
from ..study import Payload, Rendered, Settings, Study, base_cfg, finish
from ..tables import fmt, spread


# ---------------------------------------------------------------- seeds (Appendix C)
def seeds(runner: Runner, s: Settings) -> str:
    n = s.n_seeds(2, 10)
    epochs = s.budget(20, 40)
    task, model = s.task4k, "mlp"
    lrs = {"neumann": 0.3, "sgd": 0.3}
    source = "fixed"
    compare_results = runner.out / "compare" / "results.json"
    if compare_results.exists():  # the rates `compare` chose on this task, when it has run
        summ = json.loads(compare_results.read_text()).get("summary", {})
        for opt in lrs:
            if f"mlp-4k/{opt}" in summ:
                lrs[opt] = summ[f"mlp-4k/{opt}"]["lr"]
                source = "tuned in `compare`"
    configs = [
        s.scheduled(base_cfg(task=task, model=model, optimizer=opt, lr=lr, batch=128, epochs=epochs, seed=seed))
        for opt, lr in lrs.items()
        for seed in range(n)
    ]
    runs = runner.run_all(configs, "seeds")
    payload = dict(
        study="seeds", meta=dict(task=task, model=model, epochs=epochs, lrs=lrs, lr_source=source), runs=runs
    )
    return finish(runner, s, payload, render_seeds)


def render_seeds(payload: Payload, out_dir: Path) -> Rendered:
    meta, results = payload["meta"], payload["runs"]
    n = len({r["config"]["seed"] for r in results})
    lines = [
        "# seeds: spread over seeds (paper Appendix C)\n",
        f"{meta['task']}, {meta['model']}, batch 128, {meta['epochs']} epochs, {n} seeds, lr {meta['lrs']} "
        f"({meta['lr_source']}).\n",
        f"| optimizer | final test errors % | {spread(n)} | min | max |",
        "|---|---|---|---|---|",
    ]
    summary: dict[str, Any] = {}
    for key, group in by(results, "optimizer").items():
        opt = str(key[0])
        vals = [final(r) for r in sorted(group, key=lambda r: r["config"]["seed"])]
        lines.append(
            f"| {LABELS[opt]} | {', '.join(f'{v:.2f}' for v in vals)} | {fmt(*mean_std(vals))} | "
            f"{min(vals):.2f} | {max(vals):.2f} |"
        )
        summary[opt] = dict(mean=mean_std(vals)[0], std=mean_std(vals)[1], min=min(vals), max=max(vals))
    return "\n".join(lines) + "\n", summary


def verdict(summ: dict[str, Any]) -> str:
    """No rule applies: the table is the result."""
    del summ
    return "see the table"


STUDY = Study(
    name="seeds",
    help=("Appendix C: the spread of final errors over 10 seeds for Neumann and SGD (quick: 2 seeds)."),
    full_cost_core_minutes=1,
    claim=("Appendix C", "Runs with other seeds end at the same quality."),
    run=seeds,
    render=render_seeds,
    verdict=verdict,
)
