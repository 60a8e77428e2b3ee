"""The paper's studies at small scale (SPEC section 6).

A study is two functions: one that trains (through the runner's cache) and returns a *payload*
(``{"study", "meta", "runs"}``, the data), and a renderer that turns a payload into a table and
plots without training. ``neumann-repro report`` runs only the renderers, on the committed payloads
in ``docs/results/``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import Payload, Rendered, Settings, _cells, _plt, base_cfg, epoch_axis, finish, save_figure, spread
from .runner import Runner, by, epochs_to_reach, final, fmt, mean_curve, mean_std, plural
from .tuning import Protocol, summarize, tune

# "neumann": the paper's Table 1 (configs without a repulsive_weight name the paper's, as every run
# committed before the default changed); "neumann-default": the library's default, no repulsive term
LABELS = {
    "neumann": "Neumann, paper's regularizers",
    "neumann-default": "Neumann (default: no repulsive term)",
    "neumann-lr": "Neumann, regularizers scaled with lr (ours)",
    "neumann-adaptive": "Neumann, adaptive mu (ours)",
    "sgd": "SGD+Nesterov",
    "adam": "Adam",
    "adamw": "AdamW",
    "rmsprop": "RMSprop",
    "lars": "LARS",
    "lamb": "LAMB",
}
BASELINES = ("sgd", "adam", "adamw", "rmsprop", "lars", "lamb")


def _lr_range(tried: list[float]) -> str:
    return f"{len(tried)}: {min(tried):g}-{max(tried):g}"


# ---------------------------------------------------------------- compare (Table 2)
# (task, model, batch, full epoch budget); quick mode runs the first task only.
# name -> (which Settings task, model, batch, full epoch budget)
COMPARE_TASKS: dict[str, tuple[str, str, int, int]] = {
    "mlp-4k": ("task4k", "mlp", 128, 40),
    "mlp-36k": ("task_large", "mlp", 128, 30),
}
COMPARE_CENTRES = {
    "neumann-default": 0.3,
    "neumann": 0.3,
    "sgd": 0.3,
    "adam": 1e-2,
    "rmsprop": 1e-2,
    "neumann-adaptive": 0.3,
}
# what a row's name adds to its config (the optimizer is the name's first word)
ROW_ARGS: dict[str, dict[str, Any]] = {"neumann-default": dict(repulsive_weight=0.0)}


def compare(runner: Runner, s: Settings) -> str:
    tasks = dict(list(COMPARE_TASKS.items())[:1]) if s.quick else COMPARE_TASKS
    optimizers = list(COMPARE_CENTRES)
    protocol = (
        Protocol(points=3, tune_seeds=1, final_seeds=s.n_seeds(1, 5), max_extensions=1)
        if s.quick
        else Protocol(points=5, tune_seeds=2, final_seeds=s.n_seeds(1, 5), max_extensions=6)
    )
    meta_tasks = {}
    cells: dict[str, tuple[dict[str, Any], float]] = {}
    for name, (task_field, model, batch, full_epochs) in tasks.items():
        task = getattr(s, task_field)
        epochs = s.budget(20, full_epochs)
        meta_tasks[name] = dict(task=task, model=model, batch=batch, epochs=epochs)
        for opt in optimizers:
            optimizer = "neumann" if opt == "neumann-default" else opt
            cfg = base_cfg(
                task=task, model=model, optimizer=optimizer, batch=batch, epochs=epochs, **ROW_ARGS.get(opt, {})
            )
            cells[f"{name}/{opt}"] = (s.scheduled(cfg), COMPARE_CENTRES[opt])
    runs = tune(runner, cells, protocol, "compare")
    payload = dict(
        study="compare",
        meta=dict(tasks=meta_tasks, optimizers=optimizers, protocol=protocol.as_dict()),
        runs=[r for cell in runs.values() for r in cell],
    )
    return finish(runner, s, payload, render_compare)


def render_compare(payload: Payload, out_dir: Path) -> Rendered:
    meta, protocol = payload["meta"], Protocol(**payload["meta"]["protocol"])
    cells = _cells(payload["runs"])
    lines = [
        "# compare: fixed batch size (paper Table 2)\n",
        "Learning rate tuned per optimizer by the tuning protocol (a "
        f"{protocol.points}-point start, {plural(protocol.tune_seeds, 'tuning seed')} per rate, extended until the "
        f"chosen rate is inside the rates tried), then {plural(protocol.final_seeds, 'seed')} at the chosen rate; test "
        f"error (%) of those seeds, {spread(protocol.final_seeds)}. Cosine decay to 0, no warmup. 'epochs to "
        "target': first epoch "
        "whose mean test error is at or below the best baseline's final mean test error.\n",
    ]
    summary: dict[str, Any] = {}
    plt = _plt()
    tasks = meta["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, (name, t) in zip(axes[0], tasks.items(), strict=True):
        rows = {}
        for opt in meta["optimizers"]:
            runs = cells.get(f"{name}/{opt}", [])
            if not runs:
                continue
            row = summarize(runs, protocol.tune_seeds, protocol.final_seeds)
            at = [r for r in runs if r["config"]["lr"] == row["lr"] and r["config"]["seed"] < protocol.final_seeds]
            row["curve"] = mean_curve(at)
            rows[opt] = row
        base = [rows[o]["test_mean"] for o in rows if o in BASELINES]
        target = min(base) if base else math.nan
        lines += [
            f"\n## {name}: {t['model']} on {t['task']}, batch {t['batch']}, {t['epochs']} epochs\n",
            "| optimizer | tuned lr | rates tried | inside grid | final test error % | epochs to target |",
            "|---|---|---|---|---|---|",
        ]
        for opt, row in rows.items():
            e = epochs_to_reach(row["curve"], target)
            lines.append(
                f"| {LABELS[opt]} | {row['lr']:g} | {_lr_range(row['tried'])} | {'yes' if row['interior'] else 'NO'} | "
                f"{fmt(row['test_mean'], row['test_std'])} | {e if e else '—'} / {t['epochs']} |"
            )
            ax.plot(range(1, len(row["curve"]) + 1), row["curve"], label=f"{LABELS[opt]} (lr {row['lr']:g})")
            summary[f"{name}/{opt}"] = dict(
                lr=row["lr"],
                final_mean=row["test_mean"],
                final_std=row["test_std"],
                seeds=row["seeds"],
                interior=row["interior"],
                epochs_to_target=e,
            )
        lines.append(
            f"\nTarget (best baseline final mean): {target:.2f}%. Speed is not compared here: the runs share a "
            "2-core machine, so their wall-clock times vary several-fold; docs/PERFORMANCE.md has the benchmarks.\n"
        )
        ax.axhline(target, color="gray", ls=":", lw=1, label=f"target: best baseline's final ({target:.2f}%)")
        ax.set(title=f"compare: {t['model']} on {t['task']}", xlabel="epoch", ylabel="test error (%)")
        epoch_axis(ax)
        ax.set_ylim(0, min(100, 2.5 * max(target, 5)))
        ax.legend(fontsize=7)
    save_figure(fig, out_dir / "test_error.png")
    return "\n".join(lines) + "\n", summary


# ---------------------------------------------------------------- batch scaling (Table 3)
# name -> (what differs in the config, centre of the first grid at batch 256; sqrt-scaled with batch)
BATCH_VARIANTS: dict[str, tuple[dict[str, Any], float]] = {
    "neumann-default": (dict(optimizer="neumann", repulsive_weight=0.0), 1.0),
    "neumann": (dict(optimizer="neumann"), 1.0),
    "neumann-lr": (dict(optimizer="neumann", regularizer_schedule="lr"), 1.0),
    "sgd": (dict(optimizer="sgd"), 1.0),
    "adamw": (dict(optimizer="adamw"), 1e-2),
    "lars": (dict(optimizer="lars"), 10.0),
    "lamb": (dict(optimizer="lamb"), 3e-2),
}


def batch_scaling_settings(s: Settings) -> dict[str, Any]:
    if s.quick:
        return dict(task=s.task4k, model="mlp", batches=[64, 256], epochs=s.budget(6, 6), warmup_epochs=1)
    return dict(
        task=s.task_large, model="mlp", batches=[64, 128, 256, 512, 1024], epochs=s.budget(6, 50), warmup_epochs=5
    )


def batch_scaling(runner: Runner, s: Settings) -> str:
    st = batch_scaling_settings(s)
    protocol = (
        Protocol(points=3, tune_seeds=1, final_seeds=s.n_seeds(1, 3), max_extensions=1)
        if s.quick
        else Protocol(points=5, tune_seeds=1, final_seeds=s.n_seeds(1, 3), max_extensions=6)
    )
    warmup = min(st["warmup_epochs"], st["epochs"] // 2)
    cells: dict[str, tuple[dict[str, Any], float]] = {}
    for name, (v, centre) in BATCH_VARIANTS.items():
        for b in st["batches"]:
            cfg = base_cfg(task=st["task"], model=st["model"], batch=b, epochs=st["epochs"], **v)
            if v["optimizer"] != "neumann":  # Neumann's burn-in and momentum ramp are its warmup
                cfg["warmup_epochs"] = warmup
            elif s.quick:  # 6 epochs: a 1-epoch burn-in leaves 5 epochs of the Neumann phase
                cfg["burn_in_epochs"] = 1
            cells[f"{name}/{b}"] = (s.scheduled(cfg, warmup), centre * math.sqrt(b / 256))
    runs = tune(runner, cells, protocol, "batch-scaling")
    payload = dict(
        study="batch-scaling",
        meta={
            **st,
            "warmup_epochs": warmup,
            "variants": list(BATCH_VARIANTS),
            "protocol": protocol.as_dict(),
            **({"neumann_burn_in_epochs": 1} if s.quick else {}),
        },
        runs=[r for cell in runs.values() for r in cell],
    )
    return finish(runner, s, payload, render_batch_scaling)


def render_batch_scaling(payload: Payload, out_dir: Path) -> Rendered:
    meta, protocol = payload["meta"], Protocol(**payload["meta"]["protocol"])
    cells = _cells(payload["runs"])
    batches = meta["batches"]
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for name in meta["variants"]:
        for b in batches:
            if f"{name}/{b}" in cells:
                rows.setdefault(name, {})[b] = summarize(
                    cells[f"{name}/{b}"], protocol.tune_seeds, protocol.final_seeds
                )
    train_size = payload["runs"][0]["train_size"] if payload["runs"] else 0
    lines = [
        "# batch-scaling: batch size grown at a fixed epoch budget (paper Table 3)\n",
        f"{meta['model'].upper()} on {meta['task']} ({train_size:,} training examples), {meta['epochs']} epochs at "
        f"every batch size ({batches[0]} to {batches[-1]}, the largest {100 * batches[-1] / max(train_size, 1):.1f}% "
        "of the training set), cosine decay to 0. Baselines warm up linearly for "
        f"{plural(meta['warmup_epochs'], 'epoch')} (Goyal et al.); Neumann has the paper's defaults "
        f"({plural(meta.get('neumann_burn_in_epochs', 5), 'epoch')} of burn-in, its own warmup). Every cell tuned "
        f"by the same protocol: {protocol.points}-point start, {plural(protocol.tune_seeds, 'tuning seed')} per rate, "
        f"grid extended until the chosen rate is inside it, then {plural(protocol.final_seeds, 'seed')} at the chosen "
        "rate. "
        f"Test error (%) of those seeds, {spread(protocol.final_seeds)} (tuned lr).\n",
        "| optimizer | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    summary: dict[str, Any] = {}
    for name, per_b in rows.items():
        cellstr = []
        for b in batches:
            r = per_b.get(b)
            cellstr.append(f"{fmt(r['test_mean'], r['test_std'])} ({r['lr']:g})" if r else "—")
            if r:
                summary[f"{name}/{b}"] = {k: r[k] for k in ("lr", "test_mean", "test_std", "interior", "seeds")}
        lines.append(f"| {LABELS[name]} | " + " | ".join(cellstr) + " |")
    lines += [
        "\nDetails: optimizer steps per run (for Neumann: of which after burn-in), the rates tried and whether "
        "the chosen one lies strictly inside them, runs diverged at the chosen rate.\n",
        "| optimizer | batch | steps (Neumann phase) | tuned lr | rates tried | inside grid | diverged |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, per_b in rows.items():
        for b, r in per_b.items():
            ns = f" ({r['neumann_steps']})" if r["neumann_steps"] is not None else ""
            lines.append(
                f"| {LABELS[name]} | {b} | {r['steps']}{ns} | {r['lr']:g} | {_lr_range(r['tried'])} | "
                f"{'yes' if r['interior'] else 'NO'} | {r['diverged']}/{r['seeds']} |"
            )
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for k, (name, per_b) in enumerate(rows.items()):
        bs = sorted(per_b)
        ys = [per_b[b]["test_mean"] for b in bs]
        ax.errorbar(
            [b * (1 + 0.02 * (k - len(rows) / 2)) for b in bs],
            ys,
            yerr=[
                [per_b[b]["test_mean"] - per_b[b]["test_min"] for b in bs],
                [per_b[b]["test_max"] - per_b[b]["test_mean"] for b in bs],
            ],
            marker="o",
            capsize=3,
            label=LABELS[name],
            ls="-" if name.startswith("neumann") else "--",
        )
    ax.set(
        xscale="log",
        xlabel="batch size",
        ylabel="final test error (%), tuned lr",
        title=f"batch scaling at {meta['epochs']} epochs, {meta['task']} (bars: seed min-max)",
    )
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.legend(fontsize=7)
    save_figure(fig, out_dir / "batch_scaling.png")
    return "\n".join(lines) + "\n", summary


# ---------------------------------------------------------------- ablation (Table 4)
ABLATIONS: dict[str, dict[str, Any]] = {
    "default (Table 1)": {},
    "no regularizers": dict(cubic_weight=0.0, repulsive_weight=0.0),
    "no burn-in": dict(burn_in_epochs=0),
    "regularizers scaled with lr": dict(regularizer_schedule="lr"),
    "no burn-in, regularizers scaled with lr": dict(burn_in_epochs=0, regularizer_schedule="lr"),
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
    plt = _plt()
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
            summary[f"{model}/{name}"] = dict(final=fin[0], best=best, diverged=div)
            ax.plot(range(1, len(curve) + 1), curve, label=name)
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


STUDIES: dict[str, Callable[[Runner, Settings], str]] = {
    "compare": compare,
    "batch-scaling": batch_scaling,
    "ablation": ablation,
    "seeds": seeds,
}
