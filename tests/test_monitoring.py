"""Watching Neumann train: momentum monitors see the mu used (Lightning's LearningRateMonitor with
CSV and TensorBoard loggers), the optimizer's own quantities reach Lightning's loggers, the HF
Trainer's log and a plain SummaryWriter, and momentum state dicts of version 0.1 still resume."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

from neumann_optimizer import Neumann
from neumann_optimizer.monitoring import StepLog, log_step_records, step_metrics

B, TAU = 2, 2.0  # burn-in and momentum ramp of the models below


def ramp_mu(step: int) -> float:
    """The mu the step-th applied step uses: 0 in burn-in, then the paper's clipped ramp (SPEC 3)."""
    if step <= B:
        return 0.0
    t = step - B
    return min(max(1.0 - 1.0 / (1.0 + t / TAU), 0.5), 0.9)


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ---------------------------------------------------------------- the group's "momentum"
def test_group_momentum_is_the_float_mu_of_the_last_step():
    p = nn.Parameter(torch.ones(4))
    opt = Neumann([p], lr=0.1, burn_in_steps=B, reset_steps=5, momentum_ramp_steps=TAU)
    group = opt.param_groups[0]
    assert group["momentum"] == 0.0 and group["momentum_bounds"] == (0.5, 0.9)
    for s in range(1, 15):
        p.grad = torch.full_like(p, 0.1)
        opt.step()
        assert isinstance(group["momentum"], float)
        assert group["momentum"] == ramp_mu(s) == opt.step_record()["momentum"]
    assert "momentum_bounds: (0.5, 0.9)" in repr(opt)


def test_a_scheduler_writing_the_same_value_as_the_ramp_keeps_control():
    """A value written by hand (or a scheduler) takes over for good, even when it later equals
    what the ramp would give; before the first write the ramp is in charge."""
    p = nn.Parameter(torch.ones(4))
    opt = Neumann([p], lr=0.1, burn_in_steps=0, reset_steps=100, momentum_ramp_steps=TAU)
    group = opt.param_groups[0]
    p.grad = torch.ones(4)
    opt.step()
    group["momentum"] = 0.7
    opt.step()
    assert group["last_momentum"] == 0.7 and group["momentum_bounds"] is None
    for _ in range(5):  # stays 0.7 (the ramp would climb to 0.9)
        opt.step()
    assert group["last_momentum"] == 0.7 == group["momentum"]


def test_state_dict_of_version_0_1_loads_and_resumes(problem_factory):
    """0.1 kept the pair in group["momentum"] and had no "momentum_bounds"."""
    kw = dict(lr=0.05, burn_in_steps=B, reset_steps=4, momentum_ramp_steps=TAU, repulsive_weight=1e-4)
    full, cut = problem_factory([[(5, 3)]], seed=11), problem_factory([[(5, 3)]], seed=11)
    of, oc = Neumann(full.params[0], **kw), Neumann(cut.params[0], **kw)
    for _ in range(6):
        for pr, o in ((full, of), (cut, oc)):
            pr.set_grads()
            o.step()
    sd = oc.state_dict()
    for g in sd["param_groups"]:
        g["momentum"] = list(g.pop("momentum_bounds"))  # as 0.1 saved it
    resumed = Neumann(cut.params[0], **kw)
    resumed.load_state_dict(sd)
    g = resumed.param_groups[0]
    assert g["momentum_bounds"] == (0.5, 0.9) and g["momentum"] == g["last_momentum"] == ramp_mu(6)
    for _ in range(10):
        for pr, o in ((full, of), (cut, resumed)):
            pr.set_grads()
            o.step()
    assert torch.equal(full.params[0][0], cut.params[0][0])
    # 0.1's float form (a constant mu, or a scheduler's last value) stays the mu of every step
    sd = oc.state_dict()
    for gr in sd["param_groups"]:
        del gr["momentum_bounds"]
        gr["momentum"] = 0.65
    resumed = Neumann(cut.params[0], **kw)
    resumed.load_state_dict(sd)
    cut.set_grads()
    resumed.step()
    assert resumed.param_groups[0]["last_momentum"] == 0.65


# ---------------------------------------------------------------- plain loops
def test_step_metrics_match_the_step_record_and_the_gradient():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    opt = Neumann(model.parameters(), lr=0.1, burn_in_steps=B, reset_steps=3, momentum_ramp_steps=TAU)
    x = torch.randn(32, 6)
    assert step_metrics(opt) == {}
    for s in range(1, 9):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        m = step_metrics(opt)
        rec = opt.step_record()
        g = math.sqrt(sum(float(p.grad.square().sum()) for p in model.parameters()))
        assert m["neumann/grad_norm"] == pytest.approx(g, rel=1e-6)
        assert m["neumann/momentum"] == ramp_mu(s)
        assert m["neumann/phase"] == {"burn_in": 0.0, "reset": 1.0, "neumann": 2.0}[rec["phase"]]
        if rec["phase"] == "neumann":
            assert m["neumann/distance"] == rec["distance"] > 0
            assert m["neumann/cubic_to_grad"] == pytest.approx(rec["cubic_force"] / g, rel=1e-6)
        else:
            assert "neumann/distance" not in m and "neumann/cubic_to_grad" not in m  # not computed


def test_summary_writer_gets_every_nth_step_and_nothing_when_removed(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    opt = Neumann(model.parameters(), lr=0.1, burn_in_steps=B, reset_steps=3, momentum_ramp_steps=TAU)
    records = []
    original = opt.step_record
    opt.step_record = lambda group=0: records.append(group) or original(group)  # count the reads
    writer = SummaryWriter(tmp_path)
    log = log_step_records(opt, writer, every_n_steps=3)
    x = torch.randn(32, 6)
    for s in range(1, 13):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        if s == 9:
            log.remove()
    writer.close()
    assert len(records) == 3  # steps 3, 6, 9: the record (and its sync) only on the logged steps
    sc = _scalars(tmp_path)
    assert [st for st, _ in sc["neumann/momentum"]] == [3, 6, 9]
    assert [v for _, v in sc["neumann/momentum"]] == pytest.approx([ramp_mu(3), ramp_mu(6), ramp_mu(9)])
    assert {"neumann/lr", "neumann/phase", "neumann/grad_norm", "neumann/skipped_steps"} <= set(sc)


def test_step_log_validates_its_input():
    with pytest.raises(ValueError, match="every_n_steps"):
        StepLog(Neumann([nn.Parameter(torch.ones(2))], lr=0.1, steps_per_epoch=2), every_n_steps=0)
    with pytest.raises(TypeError, match="Neumann"):
        StepLog(torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1))


# ---------------------------------------------------------------- Lightning
pl = pytest.importorskip("lightning.pytorch")


class LitNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return Neumann(self.parameters(), lr=0.1, burn_in_steps=B, reset_steps=6, momentum_ramp_steps=TAU)


def _loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, 0] > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _fit(tmp_path, logger, callbacks) -> pl.Trainer:
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=3,
        accelerator="cpu",
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
    )
    trainer.fit(LitNet(), _loader())
    return trainer


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
def test_lightning_learning_rate_monitor_logs_the_mu_used(tmp_path, kind):
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    logger = CSVLogger(tmp_path) if kind == "csv" else TensorBoardLogger(tmp_path)
    monitor = LearningRateMonitor(logging_interval="step", log_momentum=True)
    trainer = _fit(tmp_path, logger, [monitor])
    if kind == "csv":
        with open(f"{logger.log_dir}/metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("lr-Neumann-momentum")]
        logged = [(int(r["step"]), float(r["lr-Neumann-momentum"])) for r in rows]
    else:
        logged = [(s, v) for s, v in _scalars(logger.log_dir)["lr-Neumann-momentum"]]
    assert len(logged) == trainer.global_step == 12
    # logged before each batch's step: at global step k, the mu of the k-th step (0 before any)
    for step, value in logged:
        assert value == pytest.approx(ramp_mu(step), abs=1e-7), (step, value)
    assert len({v for _, v in logged}) >= 4  # burn-in zeros, then the ramp


def test_lightning_neumann_monitor_reaches_every_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from neumann_optimizer.integrations.lightning import NeumannMonitor

    loggers = [CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb")]
    _fit(tmp_path, loggers, [NeumannMonitor(every_n_steps=4)])
    sc = _scalars(loggers[1].log_dir)
    steps = [s for s, _ in sc["neumann/momentum"]]
    assert steps == [4, 8, 12]
    assert [v for _, v in sc["neumann/momentum"]] == pytest.approx([ramp_mu(4), ramp_mu(8), ramp_mu(12)])
    assert [v for _, v in sc["neumann/phase"]] == [2.0, 2.0, 2.0]
    assert all(v > 0 for _, v in sc["neumann/distance"]) and "neumann/cubic_to_grad" in sc
    with open(f"{loggers[0].log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("neumann/grad_norm")]
    assert [int(r["step"]) for r in rows] == [4, 8, 12] and all(float(r["neumann/grad_norm"]) > 0 for r in rows)


# ---------------------------------------------------------------- Hugging Face Trainer
def test_hf_trainer_log_callback_reaches_log_history_and_tensorboard(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    from neumann_optimizer.integrations.transformers import NeumannLogCallback

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Linear(6, 2)

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    data = [{"x": x[i], "labels": (x[i, 0] > 0).long()} for i in range(64)]
    model = Tiny()
    opt = Neumann(model.parameters(), lr=0.1, burn_in_steps=B, reset_steps=6, momentum_ramp_steps=TAU)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        num_train_epochs=3,
        save_strategy="no",
        report_to=["tensorboard"],  # writes under output_dir/runs/
        logging_steps=100,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.add_callback(NeumannLogCallback(trainer, every_n_steps=5))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "neumann/momentum" in h]
    assert [h["step"] for h in logged] == [5, 10]
    assert [h["neumann/momentum"] for h in logged] == pytest.approx([ramp_mu(5), ramp_mu(10)])
    (logdir,) = (tmp_path / "runs").iterdir()
    sc = _scalars(logdir)
    assert [v for _, v in sc["train/neumann/momentum"]] == pytest.approx([ramp_mu(5), ramp_mu(10)])


def test_the_watch_example_logs_and_draws(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("mnist1d")
    root = Path(__file__).resolve().parent.parent
    png = tmp_path / "curves.png"
    cmd = [sys.executable, str(root / "examples" / "watch_training.py"), "--epochs", "7", "--out", str(tmp_path)]
    res = subprocess.run([*cmd, "--png", str(png)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert png.stat().st_size > 10_000 and "Warning" not in res.stderr
    for run in ("default", "paper"):
        sc = _scalars(tmp_path / run)
        assert {"neumann/momentum", "neumann/distance", "neumann/repulsive_to_grad", "test_accuracy"} <= set(sc)
    assert max(v for _, v in _scalars(tmp_path / "paper")["neumann/repulsive_to_grad"]) > 0
    assert max(v for _, v in _scalars(tmp_path / "default")["neumann/repulsive_to_grad"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "default", "paper"]  # nothing stray


class _Recorder:
    """Anything with ``add_scalar(tag, value, step)`` is a writer."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if tag == "neumann/lr":
            self.steps.append(step)


def test_logs_continue_after_a_resume(tmp_path):
    """The x-axis is the optimizer's own step count: a run resumed from a checkpoint at step 12
    logs 15, 20, ... and not 3, 8, ... again."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    kw = dict(lr=0.1, burn_in_steps=2, reset_steps=4, momentum_ramp_steps=2)
    opt = Neumann(model.parameters(), **kw)
    first = _Recorder()
    log = log_step_records(opt, first, every_n_steps=5)
    x = torch.randn(8, 4)
    for _ in range(12):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    log.remove()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    resumed = Neumann(model.parameters(), **kw)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    second = _Recorder()
    log_step_records(resumed, second, every_n_steps=5)
    for _ in range(10):
        resumed.zero_grad()
        model(x).pow(2).mean().backward()
        resumed.step()
    assert first.steps == [5, 10] and second.steps == [15, 20]


def test_log_step_records_refuses_what_is_not_a_writer():
    opt = Neumann(nn.Linear(2, 2).parameters(), lr=0.1, burn_in_steps=1, reset_steps=2, momentum_ramp_steps=1)
    with pytest.raises(TypeError, match="add_scalar"):
        log_step_records(opt, None)
    assert not opt._optimizer_step_post_hooks  # nothing was hooked
