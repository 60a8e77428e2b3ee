"""ablation: Neumann without its regularizers or its burn-in, at a fixed lr (the paper's Table 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..plotting import COLORS, epoch_axis, pyplot, save_figure
from ..runner import Runner
from ..runs import final, mean_curve, mean_std
from ..study import Payload, Rendered, Settings, Study, base_cfg, finish
from ..tables import fmt, plural
from ..verdicts import ERROR_MARGIN, error_contrast, said_error, settle

# ---------------------------------------------------------------- ablation (Table 4)
ABLATIONS: dict[str, dict[str, Any]] = {
    "default (Table 1)": {},
    "no regularizers": dict(cubic_weight=0.0, repulsive_weight=0.0),
    "no burn-in": dict(burn_in_epochs=0),
    "regularizers scaled with lr": dict(regularizer_schedule="lr"),
    "no burn-in, regularizers scaled with lr": dict(burn_in_epochs=0, regularizer_schedule="lr"),
}
# the palette's colours where a variant is one of its optimizers, others apart from every optimizer's
ABLATION_COLOURS = {
    "default (Table 1)": COLORS["neumann"],
    "no regularizers": COLORS["neumann-default"],
    "no burn-in": "tab:cyan",
    "regularizers scaled with lr": COLORS["neumann-lr"],
    "no burn-in, regularizers scaled with lr": "goldenrod",
    "SGD+Nesterov (same lr)": COLORS["sgd"],
}
ABLATION_LRS = {"cnn": 0.1, "mlp": 0.1}


def ablation(runner: Runner, s: Settings) -> str:
    models = ["cnn"] if s.quick else ["cnn", "mlp"]
    epochs = s.budget(15, 40)
    n = s.n_seeds(1, 3)
    configs = []
    for model in models:
        common = dict(task=s.task4k, model=model, lr=ABLATION_LRS[model], batch=128, epochs=epochs)
        for v in ABLATIONS.values():
            configs += [
                s.scheduled(base_cfg(**common, optimizer="neumann", seed=k, track_regularizer=True, **v))
                for k in range(n)
            ]
        configs += [s.scheduled(base_cfg(**common, optimizer="sgd", seed=k)) for k in range(n)]  # SGD at the same lr
    runs = runner.run_all(configs, "ablation")
    payload = dict(
        study="ablation",
        meta=dict(task=s.task4k, models=models, epochs=epochs, lrs=ABLATION_LRS, seeds=n),
        runs=runs,
    )
    return finish(runner, s, payload, render_ablation)


def render_ablation(payload: Payload, out_dir: Path) -> Rendered:
    meta, results = payload["meta"], payload["runs"]
    lines = [
        "# ablation: regularizers and burn-in (paper Table 4)\n",
        f"{meta['task']}, batch 128, {meta['epochs']} epochs, cosine decay to 0, lr {meta['lrs']}, "
        f"{plural(meta['seeds'], 'seed')}. 'best' is the lowest mean test error along the run and its epoch; "
        "'repulsive > |g|' is the fraction of regularized steps whose repulsive force beta/r^2 exceeded the "
        "mini-batch gradient norm: over the whole run / over its last 10% of steps.\n",
        "| model | variant | final test error % | best test error % (epoch) | diverged runs | repulsive > |g| |",
        "|---|---|---|---|---|---|",
    ]
    summary: dict[str, Any] = {}
    plt = pyplot()
    models = meta["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        variants: list[tuple[str, dict[str, Any]]] = [
            (name, dict(optimizer="neumann", **v)) for name, v in ABLATIONS.items()
        ]
        variants.append(("SGD+Nesterov (same lr)", dict(optimizer="sgd")))
        for name, v in variants:
            runs = [
                r
                for r in results
                if r["config"]["model"] == model
                and r["config"]["optimizer"] == v["optimizer"]
                and (v["optimizer"] == "sgd" or _variant_matches(r["config"], v))
            ]
            if not runs:
                continue
            curve = mean_curve(runs)
            fin = mean_std(final(r) for r in runs)
            best = min(curve)
            div = sum(r["diverged"] for r in runs)
            lines.append(
                f"| {model} | {name} | {fmt(*fin)} | {best:.2f} ({curve.index(best) + 1}) | "
                f"{div}/{len(runs)} | {_fractions(runs)} |"
            )
            seeds = [final(r) for r in sorted(runs, key=lambda r: r["config"]["seed"])]
            summary[f"{model}/{name}"] = dict(final=fin[0], best=best, diverged=div, report=seeds)
            ax.plot(range(1, len(curve) + 1), curve, label=name, color=ABLATION_COLOURS[name])
        finals = [v["final"] for k, v in summary.items() if k.startswith(f"{model}/")]
        ax.set(
            title=f"ablation: {model}",
            xlabel="epoch",
            ylabel="test error (%)",
            ylim=(0, min(100, 2.5 * max(finals, default=40))),
        )
        epoch_axis(ax)
        ax.legend(fontsize=7)
    save_figure(fig, out_dir / "ablation.png")
    return "\n".join(lines) + "\n", summary


def _fractions(runs: list[dict[str, Any]]) -> str:
    alls = [r.get("repulsive_exceeds_grad_fraction") for r in runs]
    lasts = [r.get("repulsive_exceeds_grad_fraction_last10") for r in runs]
    if any(f is None for f in alls + lasts):
        return "—"
    return f"{sum(alls) / len(alls):.2f} / {sum(lasts) / len(lasts):.2f}"  # type: ignore[arg-type]


def _variant_matches(cfg: dict[str, Any], v: dict[str, Any]) -> bool:
    keys = ("cubic_weight", "repulsive_weight", "burn_in_epochs", "regularizer_schedule")
    return all(cfg.get(k) == v.get(k) for k in keys)


def verdict(summ: dict[str, Any]) -> str:
    """The rule-based verdict from the summary :func:`render_ablation` returns: per model, "no
    regularizers" against the default (a drop: positive, worse) and against SGD+Nesterov at the same
    lr, with 95% Welch intervals, Holm-adjusted over all of them (no seed tunes anything here)."""
    cells = []
    for model in sorted({k.split("/")[0] for k in summ}):
        d, nr = summ.get(f"{model}/default (Table 1)"), summ.get(f"{model}/no regularizers")
        sgd = summ.get(f"{model}/SGD+Nesterov (same lr)")
        if d and nr and sgd and "report" in nr:
            cells.append(
                (model, error_contrast(nr["report"], d["report"]), error_contrast(nr["report"], sgd["report"]))
            )
    family = [c for _, *cs in cells for c in cs]
    settle(family, ERROR_MARGIN)
    parts = []
    for model, drop, vs_sgd in cells:
        seen = drop is not None and drop["decision"] == "differs" and drop["diff"] > 0
        above = vs_sgd is not None and vs_sgd["decision"] == "differs" and vs_sgd["diff"] < 0
        parts.append(
            f"{model}: without the regularizers minus the default {said_error(drop, 'without')} "
            f"({'a drop' if seen else 'no drop shown'}); without them minus SGD+Nesterov at the same lr "
            f"{said_error(vs_sgd, 'without')} ({'better than the baseline' if above else 'not shown better'})"
        )
    return "; ".join(parts) + (f" (Holm over {len(family)} tests)" if family else "")


STUDY = Study(
    name="ablation",
    help=(
        "Table 4: Neumann without regularizers, without burn-in, with lr-scaled regularizers, and SGD, "
        "at a fixed lr on MNIST-1D 4k (CNN and MLP; quick: CNN, 15 epochs)."
    ),
    full_cost_core_minutes=11,
    claim=("Table 4", "Without the regularizers quality drops but stays above the baseline."),
    run=ablation,
    render=render_ablation,
    verdict=verdict,
)
