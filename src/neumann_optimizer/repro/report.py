"""docs/REPRODUCTION.md and its plots as pure functions of the committed results.

``neumann-repro report`` reads ``docs/results/STUDY.json`` (what the full studies wrote), renders
each study's tables and plots with the study's own renderer and writes the report; nothing is
trained. With ``--quick`` it reads the quick runs under ``--out`` instead.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .architectures import render_architectures
from .architectures import verdict as architectures_verdict
from .common import Payload, Rendered, Settings
from .critical_batch import render_critical_batch
from .curvature import render_curvature
from .regularizers import render_regularizers
from .studies import BASELINES, LABELS, render_ablation, render_batch_scaling, render_compare, render_seeds


def renderers() -> dict[str, Callable[[Payload, Path], Rendered]]:
    """Each study's renderer: a pure function of its payload (tables, summary, plots)."""
    return {
        "compare": render_compare,
        "batch-scaling": render_batch_scaling,
        "ablation": render_ablation,
        "seeds": render_seeds,
        "curvature": render_curvature,
        "regularizers": render_regularizers,
        "critical-batch": render_critical_batch,
        "architectures": render_architectures,
    }


CLAIMS = {
    "compare": (
        "Table 2",
        "At a fixed batch size, a better final validation error than a tuned baseline "
        "(0.8-0.9 points on ImageNet), or the baseline's error in 10-30% fewer steps.",
    ),
    "batch-scaling": (
        "Table 3, Figure 3",
        "Batch grown 20x (1600 to 32000) with the same epochs and no loss of quality "
        "relative to the baseline at small batch.",
    ),
    "ablation": ("Table 4", "Without the regularizers quality drops but stays above the baseline."),
    "seeds": ("Appendix C", "Runs with other seeds end at the same quality."),
    "curvature": (
        "Figure 4",
        "Along training, lambda_max of the mini-batch Hessian grows about linearly and "
        "lambda_min rises towards 0 from below.",
    ),
    "regularizers": (
        "Section 3.2, Table 1",
        "The repulsive term keeps the iterate away from the moving average and starts to dominate when the "
        "learning rate becomes small; the paper's constant alpha and beta are used throughout training.",
    ),
    "critical-batch": (
        "Section 1 (the central hypothesis), Table 3",
        "The optimizer 'is able to efficiently use large batches': in steps to a target, perfect scaling should "
        "reach larger batches than with momentum SGD (and, by Zhang et al. 2019's noisy quadratic model, as with "
        "other preconditioned methods).",
    ),
    "architectures": (
        "Tables 2-4, Section 4.4",
        "The gains hold on BatchNorm convnets (Inception, ResNets; Table 3's batch scaling included); on a "
        "recurrent sequence model trained with aggressive gradient clipping Neumann did not beat the baseline, "
        "which the authors attribute to the Hessian approximation breaking down.",
    ),
}

PROTOCOL = """\
## Tuning protocol (compare and batch-scaling)

The same for every optimizer (Nado et al. 2021's point: a claim holds only against baselines tuned
as hard as the method):

- **Learning rate** on one log grid for all, 1-3-10 per decade (..., 0.01, 0.03, 0.1, 0.3, 1, ...).
  Each cell (optimizer x batch size x task) starts from 5 consecutive grid rates around a guess;
  the chosen rate is the one with the lowest mean final *validation* error over the tuning seeds
  (ties: the smaller rate). While the chosen rate lies on an edge of the rates tried, the grid is
  extended by one rate beyond that edge (at most 6 times). Then the two geometric midpoints between
  the chosen grid rate and its neighbours are tried too (factor about 1.8 either side), and the
  choice is made again over all rates tried: 7 rates per cell when no extension was needed. The
  tables say how many rates each cell tried and whether its choice lies strictly inside them.
- **Seeds**: the chosen rate is then trained with more seeds (3 in batch-scaling, 5 in compare);
  test errors are those seeds' final test errors, mean ± standard deviation. Tuning seeds are
  1 in batch-scaling and 2 in compare (its runs are cheaper).
- **Warmup**: a fixed, documented fraction rather than a tuned one: the baselines warm up linearly
  over the first 5 epochs (Goyal et al.'s recipe, 10% of the batch-scaling budget), then every
  optimizer follows cosine decay to 0. Neumann has no added warmup: its 5 epochs of burn-in (plain
  SGD) and its momentum ramp are its own (the paper's Table 1). compare uses no warmup for anyone.
- **Baselines** are other people's code, configured as their documentation says:
  `torch.optim.SGD(momentum=0.9, nesterov=True)`, `torch.optim.Adam`/`AdamW` (torch defaults,
  AdamW's weight decay 0.01), `torch.optim.RMSprop(alpha=0.9, eps=1e-8)`, and `pytorch_optimizer`'s
  `LARS` (momentum 0.9, trust coefficient 1e-3, biases and norms plain SGD) and `Lamb`
  (betas (0.9, 0.999), eps 1e-6, no weight decay). Neumann runs with the paper's Table 1 defaults.
- **Diverged** runs count as chance (90% error) when tuning.
- **Verdict rule**: a difference between two means counts only beyond two standard errors of the
  difference (2 x sqrt(s1^2/n1 + s2^2/n2) over seeds); within that it is a tie.
"""


def _load(study: str, source_dir: Path, source: str) -> dict[str, Any] | None:
    path = source_dir / f"{study}.json" if source == "results" else source_dir / study / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _noise(a: dict[str, Any], b: dict[str, Any], mean: str, std: str, n: str) -> float:
    return 2 * math.sqrt(a[std] ** 2 / max(a[n], 1) + b[std] ** 2 / max(b[n], 1))


def _judge(diff: float, noise: float) -> str:
    """``diff`` = Neumann's advantage (positive: Neumann lower error)."""
    if diff > noise:
        return "better beyond seed noise"
    if diff < -noise:
        return "worse beyond seed noise"
    return "a tie within seed noise"


def verdict(study: str, summ: dict[str, Any]) -> str:
    """A rule-based verdict from a study's summary (rule: see the tuning protocol)."""
    if study == "compare":
        parts = []
        for task in sorted({k.split("/")[0] for k in summ}):
            neu = summ.get(f"{task}/neumann-default") or summ.get(f"{task}/neumann")
            bases = [(o, summ[f"{task}/{o}"]) for o in BASELINES if f"{task}/{o}" in summ]
            if neu is None or not bases:
                continue
            name, base = min(bases, key=lambda kv: kv[1]["final_mean"])
            gap = base["final_mean"] - neu["final_mean"]
            judged = _judge(gap, _noise(neu, base, "final_mean", "final_std", "seeds"))
            word = "reproduced" if judged.startswith("better") else "not reproduced"
            parts.append(
                f"{task}: Neumann {neu['final_mean']:.2f}% vs best baseline ({LABELS[name]}) "
                f"{base['final_mean']:.2f}%, {gap:+.2f} points in Neumann's favour, {judged}: **{word}**"
            )
        return "; ".join(parts) or "no results"
    if study == "batch-scaling":
        batches = sorted({int(k.split("/")[1]) for k in summ})
        small, large = (batches[0], batches[-1]) if batches else (0, 0)
        row = "neumann-default" if f"neumann-default/{large}" in summ else "neumann"
        if f"{row}/{large}" not in summ:
            return "no results"
        neu = summ[f"{row}/{large}"]
        bases = [(o, summ[f"{o}/{small}"]) for o in BASELINES if f"{o}/{small}" in summ]
        name, base = min(bases, key=lambda kv: kv[1]["test_mean"])
        loss = neu["test_mean"] - base["test_mean"]
        noise = _noise(neu, base, "test_mean", "test_std", "seeds")
        word = "reproduced" if loss <= noise else "not reproduced"
        out = (
            f"Neumann at batch {large}: {neu['test_mean']:.2f}% vs the best baseline at batch {small} "
            f"({LABELS[name]}): {base['test_mean']:.2f}%; a loss of {loss:+.2f} points against a seed noise of "
            f"{noise:.2f}: **{word}**"
        )
        at_large = [(o, summ[f"{o}/{large}"]) for o in BASELINES if f"{o}/{large}" in summ]
        if at_large:
            bn, bl = min(at_large, key=lambda kv: kv[1]["test_mean"])
            gap = bl["test_mean"] - neu["test_mean"]
            out += (
                f". At batch {large} itself, Neumann vs the best baseline there ({LABELS[bn]}, "
                f"{bl['test_mean']:.2f}%): {gap:+.2f} points in Neumann's favour, "
                f"{_judge(gap, _noise(neu, bl, 'test_mean', 'test_std', 'seeds'))}"
            )
        return out
    if study == "ablation":
        parts = []
        for model in sorted({k.split("/")[0] for k in summ}):
            d = summ.get(f"{model}/default (Table 1)")
            nr = summ.get(f"{model}/no regularizers")
            sgd = summ.get(f"{model}/SGD+Nesterov (same lr)")
            if d and nr and sgd:
                drop = nr["final"] - d["final"]
                above = nr["final"] < sgd["final"]
                parts.append(
                    f"{model}: removing the regularizers changes the final error by {drop:+.2f} points "
                    f"({'a drop' if drop > 0 else 'no drop'}); without them Neumann is "
                    f"{'better' if above else 'not better'} than SGD at the same lr"
                )
        return "; ".join(parts)
    if study == "regularizers":
        chosen = summ.get("chosen")
        cells = sorted({k.rsplit("/", 1)[0] for k in summ if k != "chosen"})
        paper = [summ[f"{c}/paper"]["late_loss"] for c in cells if f"{c}/paper" in summ]
        out = f"the paper's regularizers give back {min(paper):+.2f} to {max(paper):+.2f} points late in the run"
        if chosen:
            late = [summ[f"{c}/{chosen}"]["late_loss"] for c in cells if f"{c}/{chosen}" in summ]
            out += f"; the default chosen by the rule ({chosen}) at most {max(late):+.2f}"
        return out + ": **the late loss is the paper's repulsive term**" if chosen == "no-repulsive" else out
    if study == "critical-batch":
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
    if study == "architectures":
        return architectures_verdict(summ)
    return "see the table"


def has_results(source_dir: Path, source: str) -> bool:
    """Whether ``source_dir`` holds any study's results (committed files, or quick runs' outputs)."""
    return any(_load(study, source_dir, source) is not None for study in CLAIMS)


def write_report(
    source_dir: Path, report: Path, settings: Settings, source: str = "results", notes: Path | None = None
) -> None:
    """Render every study found in ``source_dir`` into ``report`` and ``report.parent/img``, with the
    hand-written discussion ``notes`` (default: ``docs/reproduction_notes.md`` beside the results)."""
    report.parent.mkdir(parents=True, exist_ok=True)
    img = report.parent / "img"
    img.mkdir(exist_ok=True)
    where = "`docs/results/`" if source == "results" else f"`{source_dir}` (quick runs)"
    lines = [
        "# Reproduction at small scale",
        "",
        f"Generated by `neumann-repro report` from the results in {where}, without training "
        "(rerun a study with `neumann-repro STUDY`; runs already in `docs/results/` are not recomputed). "
        "The paper trained ImageNet models on 50-250 GPUs; we run the same studies on MNIST-1D, generated "
        "offline, on 2 CPU cores. Verdicts compare our numbers with the paper's claims (SPEC section 6) "
        "by the rule stated below; read the settings before generalising them.",
        "",
        PROTOCOL,
    ]
    render = renderers()
    for study, (where_in_paper, claim) in CLAIMS.items():
        payload = _load(study, source_dir, source)
        lines += [
            f"## {study} ({where_in_paper})",
            "",
            f"**Paper:** {claim}",
            "",
            f"**Command:** `neumann-repro {study}{' --quick' if settings.quick else ''}`",
            "",
        ]
        if payload is None:
            lines += ["Not run yet.", ""]
            continue
        with tempfile.TemporaryDirectory() as tmp:
            table, summary = render[study](payload, Path(tmp))
            pngs = sorted(Path(tmp).glob("*.png"))
            for png in pngs:
                shutil.copyfile(png, img / f"{study}-{png.name}")
        lines += [table.split("\n", 1)[1].strip().replace("## ", "### "), ""]
        lines += [f"![{study}]({img.name}/{study}-{png.name})\n" for png in pngs]
        lines += [f"**Verdict (rule-based):** {verdict(study, summary)}", ""]
    notes = notes if notes is not None else source_dir.parent / "reproduction_notes.md"
    if notes.exists() and source == "results":  # the hand-written discussion of the committed numbers
        lines += [notes.read_text().strip(), ""]
    report.write_text("\n".join(lines))
