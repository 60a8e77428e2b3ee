"""The paper's studies at small scale (SPEC section 6). Each writes results.json, table.md, PNGs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .runner import Runner, by, epochs_to_reach, final, fmt, mean_curve, mean_std, tune_lr

# Same-size learning-rate grids (log-spaced, factor ~3) for every optimizer.
LR_GRIDS = {
    "neumann": [0.01, 0.03, 0.1, 0.3, 1.0],
    "sgd": [0.01, 0.03, 0.1, 0.3, 1.0],
    "adam": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "rmsprop": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
}
LR_GRIDS_EXTRA = {"neumann-adaptive": LR_GRIDS["neumann"]}  # our extension, full mode only
LABELS = {
    "neumann": "Neumann",
    "sgd": "SGD+Nesterov",
    "adam": "Adam",
    "rmsprop": "RMSprop",
    "neumann-adaptive": "Neumann, adaptive mu (ours)",
}


@dataclass
class Settings:
    quick: bool
    seeds: int
    task4k: str = "mnist1d-4k"
    task80k: str = "mnist1d-80k"
    epochs: int | None = None  # overrides every study's epoch budget (tests, smoke runs)

    def budget(self, quick: int, full: int) -> int:
        return self.epochs if self.epochs is not None else (quick if self.quick else full)


def grid(opt: str, quick: bool) -> list[float]:
    g = {**LR_GRIDS, **LR_GRIDS_EXTRA}[opt]
    return g[1:4] if quick else g


def base_cfg(**kw: Any) -> dict[str, Any]:
    cfg = dict(warmup_epochs=0)
    cfg.update(kw)
    return cfg


def write(study_dir: Path, results: list[dict[str, Any]], table: str, extra: dict[str, Any] | None = None) -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    payload = {"runs": results, **(extra or {})}
    (study_dir / "results.json").write_text(json.dumps(payload, indent=1))
    (study_dir / "table.md").write_text(table)


def finish(
    runner: Runner,
    study: str,
    fig: Any,
    png: str,
    lines: list[str],
    results: list[dict[str, Any]],
    summary: dict[str, Any],
) -> str:
    """Save the study's figure, table and results; return the table."""
    study_dir = runner.out / study
    study_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(study_dir / png, dpi=110)
    _plt().close(fig)
    table = "\n".join(lines) + "\n"
    write(study_dir, results, table, {"summary": summary})
    return table


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------- compare (Table 2)
def compare(runner: Runner, s: Settings) -> str:
    models = ["mlp", "cnn"]
    epochs = s.budget(20, 40)
    optimizers = [*LR_GRIDS] if s.quick else [*LR_GRIDS, *LR_GRIDS_EXTRA]
    configs = [
        base_cfg(task=s.task4k, model=model, optimizer=opt, lr=lr, batch=128, epochs=epochs, seed=seed)
        for model in models
        for opt in optimizers
        for lr in grid(opt, s.quick)
        for seed in range(s.seeds)
    ]
    results = runner.run_all(configs, "compare")
    lines = [
        "# compare: fixed batch size (paper Table 2)\n",
        f"MNIST-1D 4k, batch 128, {epochs} epochs, cosine decay to 0, {s.seeds} seed(s); learning rate "
        "tuned per optimizer on the validation split over a "
        f"{len(grid('sgd', s.quick))}-point grid; test error (%) at the tuned rate. 'epochs to target': first "
        "epoch whose mean test error is at or below the best baseline's final mean test error.\n",
    ]
    summary: dict[str, Any] = {}
    plt = _plt()
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        rows: dict[str, dict[str, Any]] = {}
        for opt in optimizers:
            runs = [r for r in results if r["config"]["model"] == model and r["config"]["optimizer"] == opt]
            lr = tune_lr(runs)
            best = [r for r in runs if r["config"]["lr"] == lr]
            rows[opt] = dict(lr=lr, runs=best, final=mean_std(final(r) for r in best), curve=mean_curve(best))
        target = min(rows[o]["final"][0] for o in ("sgd", "adam", "rmsprop"))
        lines += [
            f"\n## {model}\n",
            "| optimizer | tuned lr | final test error % | epochs to target | s per run |",
            "|---|---|---|---|---|",
        ]
        for opt, row in rows.items():
            e = epochs_to_reach(row["curve"], target)
            secs = mean_std(r["seconds"] for r in row["runs"])[0]
            lines.append(
                f"| {LABELS[opt]} | {row['lr']:g} | {fmt(*row['final'])} | {e if e else '—'} / {epochs} | {secs:.1f} |"
            )
            ax.plot(range(1, len(row["curve"]) + 1), row["curve"], label=f"{LABELS[opt]} (lr {row['lr']:g})")
            summary[f"{model}/{opt}"] = dict(
                lr=row["lr"], final_mean=row["final"][0], final_std=row["final"][1], epochs_to_target=e
            )
        lines.append(f"\nTarget (best baseline final mean): {target:.2f}%\n")
        ax.axhline(target, color="gray", ls=":", lw=1)
        ax.set(title=f"compare: {model} on MNIST-1D 4k", xlabel="epoch", ylabel="test error (%)")
        ax.set_ylim(0, min(100, 2.5 * max(target, 5)))
        ax.legend()
    return finish(runner, "compare", fig, "test_error.png", lines, results, summary)


# ---------------------------------------------------------------- batch scaling (Table 3)
def batch_scaling(runner: Runner, s: Settings) -> str:
    task = s.task4k if s.quick else s.task80k
    batches = [128, 1024] if s.quick else [128, 1024, 8192]
    n_seeds = s.seeds if s.quick else min(s.seeds, 2)  # 2 seeds of the 80k set fit the 90-minute budget
    epochs = s.budget(6, 12)
    base = {"neumann": 0.1, "sgd": 0.1}
    multipliers = [0.5, 2.0] if s.quick else [0.25, 1.0, 4.0]
    if 1.0 not in multipliers:
        multipliers = sorted({*multipliers, 1.0})
    # Neumann's own warmup: 5 epochs of burn-in, then its momentum ramps from 0.5 (epoch 6) to 0.75
    # (epoch 8); 'long' SGD warms up for those 8 epochs (capped at 2/3 of a short budget).
    long_warmup = min(8, (2 * epochs) // 3)
    variants: dict[str, dict[str, Any]] = {
        "neumann": dict(optimizer="neumann"),
        "sgd-goyal": dict(optimizer="sgd", warmup_epochs=5),
        f"sgd-long{long_warmup}": dict(optimizer="sgd", warmup_epochs=long_warmup),
    }
    configs = []
    for v in variants.values():
        for b in batches:
            for mult in multipliers:
                lr = base[v["optimizer"]] * (b / 128) * mult
                for seed in range(n_seeds):
                    configs.append(
                        dict(
                            task=task,
                            model="cnn",
                            lr=round(lr, 6),
                            batch=b,
                            epochs=epochs,
                            seed=seed,
                            **{"warmup_epochs": 0, **v},
                        )
                    )
    results = runner.run_all(configs, "batch-scaling")
    lines = [
        "# batch-scaling: batch size grown at a fixed epoch budget (paper Table 3)\n",
        f"{task}, CNN with BatchNorm, {epochs} epochs, cosine decay, {n_seeds} seed(s). Learning rate: "
        f"linear scaling from {base} at batch 128 (column 'linear'), and tuned per batch over "
        f"multipliers {multipliers} of the linear rate on the validation split (column 'tuned'). "
        f"SGD with Goyal et al.'s 5-epoch warmup and with a {long_warmup}-epoch warmup.\n",
        "| optimizer | batch | steps/epoch | linear: test error % | tuned lr | tuned: test error % |",
        "|---|---|---|---|---|---|",
    ]
    summary: dict[str, Any] = {}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, v in variants.items():
        xs, ys = [], []
        for b in batches:
            runs = [
                r
                for r in results
                if r["config"]["batch"] == b
                and r["config"]["optimizer"] == v["optimizer"]
                and r["config"].get("warmup_epochs", 0) == v.get("warmup_epochs", 0)
            ]
            lin_lr = round(base[v["optimizer"]] * b / 128, 6)
            lin = mean_std(final(r) for r in runs if r["config"]["lr"] == lin_lr)
            lr = tune_lr(runs)
            tuned = mean_std(final(r) for r in runs if r["config"]["lr"] == lr)
            spe = runs[0]["steps_per_epoch"]
            lines.append(f"| {name} | {b} | {spe} | {fmt(*lin)} | {lr:g} | {fmt(*tuned)} |")
            summary[f"{name}/{b}"] = dict(linear=lin[0], tuned=tuned[0], tuned_lr=lr)
            xs.append(b)
            ys.append(tuned[0])
        ax.plot(xs, ys, marker="o", label=name)
    ax.set(xscale="log", xlabel="batch size", ylabel="final test error (%), tuned lr", title=f"batch scaling, {task}")
    ax.legend()
    return finish(runner, "batch-scaling", fig, "batch_scaling.png", lines, results, summary)


# ---------------------------------------------------------------- ablation (Table 4)
ABLATIONS: dict[str, dict[str, Any]] = {
    "default (Table 1)": {},
    "no regularizers": dict(cubic_weight=0.0, repulsive_weight=0.0),
    "no burn-in": dict(burn_in_epochs=0),
    "regularizers scaled with lr": dict(regularizer_schedule="lr"),
    "no burn-in, regularizers scaled with lr": dict(burn_in_epochs=0, regularizer_schedule="lr"),
}


def ablation(runner: Runner, s: Settings) -> str:
    models = ["cnn"] if s.quick else ["cnn", "mlp"]
    epochs = s.budget(15, 40)
    lrs = {"cnn": 0.1, "mlp": 0.1}
    configs = []
    for model in models:
        for v in ABLATIONS.values():
            for seed in range(s.seeds):
                configs.append(
                    base_cfg(
                        task=s.task4k,
                        model=model,
                        optimizer="neumann",
                        lr=lrs[model],
                        batch=128,
                        epochs=epochs,
                        seed=seed,
                        track_regularizer=True,
                        **v,
                    )
                )
            # SGD reference at the same lr
        for seed in range(s.seeds):
            configs.append(
                base_cfg(
                    task=s.task4k, model=model, optimizer="sgd", lr=lrs[model], batch=128, epochs=epochs, seed=seed
                )
            )
    results = runner.run_all(configs, "ablation")
    lines = [
        "# ablation: regularizers and burn-in (paper Table 4)\n",
        f"MNIST-1D 4k, batch 128, {epochs} epochs, cosine decay to 0, lr {lrs}, {s.seeds} seed(s). "
        "'best' is the lowest mean test error along the run and its epoch; 'repulsive > |g|' is the "
        "fraction of regularized steps whose repulsive force beta/r^2 exceeded the mini-batch gradient "
        "norm: over the whole run / over its last 10% of steps.\n",
        "| model | variant | final test error % | best test error % (epoch) | diverged runs | repulsive > |g| |",
        "|---|---|---|---|---|---|",
    ]
    summary: dict[str, Any] = {}
    plt = _plt()
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        rows: list[tuple[str, dict[str, Any]]] = [
            (name, dict(optimizer="neumann", **v)) for name, v in ABLATIONS.items()
        ]
        rows.append(("SGD+Nesterov (same lr)", dict(optimizer="sgd")))
        for name, v in rows:
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
            frac_s = _fractions(runs)
            lines.append(
                f"| {model} | {name} | {fmt(*fin)} | {best:.2f} ({curve.index(best) + 1}) | "
                f"{div}/{len(runs)} | {frac_s} |"
            )
            summary[f"{model}/{name}"] = dict(final=fin[0], best=best, diverged=div)
            ax.plot(range(1, len(curve) + 1), curve, label=name)
        finals = [v["final"] for k, v in summary.items() if k.startswith(f"{model}/")]
        ax.set(
            title=f"ablation: {model}",
            xlabel="epoch",
            ylabel="test error (%)",
            ylim=(0, min(100, 2.5 * max(finals, default=40))),
        )
        ax.legend(fontsize=7)
    return finish(runner, "ablation", fig, "ablation.png", lines, results, summary)


def _fractions(runs: list[dict[str, Any]]) -> str:
    alls = [r.get("repulsive_exceeds_grad_fraction") for r in runs]
    lasts = [r.get("repulsive_exceeds_grad_fraction_last10") for r in runs]
    if any(f is None for f in alls + lasts):
        return "—"
    return f"{sum(alls) / len(alls):.2f} / {sum(lasts) / len(lasts):.2f}"  # type: ignore[arg-type]


def _variant_matches(cfg: dict[str, Any], v: dict[str, Any]) -> bool:
    keys = ("cubic_weight", "repulsive_weight", "burn_in_epochs", "regularizer_schedule")
    return all(cfg.get(k) == v.get(k) for k in keys)


# ---------------------------------------------------------------- seeds (Appendix C)
def seeds(runner: Runner, s: Settings) -> str:
    n = max(s.seeds, 2 if s.quick else 5)
    epochs = s.budget(20, 40)
    model = "mlp" if s.quick else "cnn"
    lrs = {"neumann": 0.1, "sgd": 0.1}
    compare_summary = runner.out / "compare" / "results.json"
    if compare_summary.exists():
        summ = json.loads(compare_summary.read_text()).get("summary", {})
        for opt in lrs:
            if f"{model}/{opt}" in summ:
                lrs[opt] = summ[f"{model}/{opt}"]["lr"]
    configs = [
        base_cfg(task=s.task4k, model=model, optimizer=opt, lr=lr, batch=128, epochs=epochs, seed=seed)
        for opt, lr in lrs.items()
        for seed in range(n)
    ]
    results = runner.run_all(configs, "seeds")
    lines = [
        "# seeds: spread over seeds (paper Appendix C)\n",
        f"MNIST-1D 4k, {model}, batch 128, {epochs} epochs, {n} seeds, lr {lrs} (tuned in `compare` when "
        "its results exist).\n",
        "| optimizer | final test errors % | mean ± std | min | max |",
        "|---|---|---|---|---|",
    ]
    for key, group in by(results, "optimizer").items():
        opt = str(key[0])
        vals = [final(r) for r in sorted(group, key=lambda r: r["config"]["seed"])]
        lines.append(
            f"| {LABELS[opt]} | {', '.join(f'{v:.2f}' for v in vals)} | {fmt(*mean_std(vals))} | "
            f"{min(vals):.2f} | {max(vals):.2f} |"
        )
    table = "\n".join(lines) + "\n"
    write(runner.out / "seeds", results, table)
    return table


STUDIES = {"compare": compare, "batch-scaling": batch_scaling, "ablation": ablation, "seeds": seeds}
