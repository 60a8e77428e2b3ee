"""EvaluationWeightsCallback with the real Hugging Face Trainer (tiny model, CPU, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from neumann_optimizer import Neumann, ScheduleWarning  # noqa: E402
from neumann_optimizer.integrations.transformers import EvaluationWeightsCallback  # noqa: E402

N, D = 96, 6


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def _dataset(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    y = (x[:, 0] - 0.5 * x[:, 1] > 0).long()
    return [{"x": x[i], "labels": y[i]} for i in range(N)]


def _trainer(tmp_path, model, callbacks=(), eval_steps=None, **kw):
    # 96 examples / batch 16 = 6 steps an epoch, 3 epochs: 18 steps; burn-in 3, ramp 3
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        num_train_epochs=3,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        save_strategy=kw.pop("save_strategy", "no"),
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        **kw,
    )
    opt = Neumann(model.parameters(), lr=0.1, burn_in_steps=3, reset_steps=8, momentum_ramp_steps=3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    return Trainer(
        model=model,
        args=args,
        train_dataset=_dataset(0),
        eval_dataset=_dataset(1),
        optimizers=(opt, sched),
        callbacks=list(callbacks),
    ), opt


def _eval_weights_from_state(opt: Neumann) -> list[torch.Tensor]:
    """w - mu m from the kept training weights (independent of eval())."""
    g = opt.param_groups[0]
    return [opt.state[p]["train_param"].clone().add_(opt.state[p]["m"], alpha=-g["last_momentum"]) for p in g["params"]]


@pytest.mark.parametrize("eval_steps", [None, 10])
def test_model_ends_at_evaluation_weights_and_save_model_exports_them(tmp_path, eval_steps):
    # without evaluations the model would end at w (the Trainer evaluates at the last step when
    # it evaluates at all, so then it ends at w - mu m by itself)
    model = Tiny()
    trainer, opt = _trainer(tmp_path, model, [EvaluationWeightsCallback()], eval_steps=eval_steps)
    trainer.train()
    assert not opt.training and opt.param_groups[0]["last_momentum"] > 0
    expected = _eval_weights_from_state(opt)
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p, e)
    trainer.save_model(str(tmp_path / "export"))
    saved = load_file(str(tmp_path / "export" / "model.safetensors"))
    for (name, _), e in zip(model.named_parameters(), expected, strict=True):
        assert torch.equal(saved[name], e)
    trainer.evaluate()  # a later evaluation does not shift them again
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p, e)


def test_without_the_callback_a_run_without_evaluation_ends_at_training_weights(tmp_path):
    model = Tiny()
    trainer, opt = _trainer(tmp_path, model)
    trainer.train()
    assert opt.training  # the model holds w, and save_model would export it: what the callback fixes


class _SeenAtEvaluation(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_evaluate(self, args, state, control, optimizer=None, **kwargs):
        self.modes.append(optimizer.optimizer.training)  # the Accelerate wrapper's Neumann


def test_interleaved_evaluation_leaves_training_bit_identical(tmp_path):
    a, b = Tiny(), Tiny()
    seen = _SeenAtEvaluation()
    ta, oa = _trainer(tmp_path / "a", a, [EvaluationWeightsCallback(), seen], eval_steps=4)
    ta.train()
    assert len(seen.modes) == 5 and not any(seen.modes)  # every evaluation ran at w - mu m
    tb, ob = _trainer(tmp_path / "b", b, [EvaluationWeightsCallback()])
    tb.train()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    oa.train()
    ob.train()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_resume_from_checkpoint_saved_after_evaluation_is_exact(tmp_path):
    full = Tiny()
    t1, _o1 = _trainer(
        tmp_path / "run", full, [EvaluationWeightsCallback()], eval_steps=6, save_strategy="steps", save_steps=6
    )
    t1.train()
    end = [p.detach().clone() for p in full.parameters()]
    resumed = Tiny()
    t2, _o2 = _trainer(tmp_path / "resume", resumed, [EvaluationWeightsCallback()], eval_steps=6)
    t2.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-12"))
    for a, b in zip(end, resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_load_best_model_at_end_keeps_the_best_checkpoint_weights(tmp_path):
    model = Tiny()
    trainer, _opt = _trainer(
        tmp_path,
        model,
        [EvaluationWeightsCallback()],
        eval_steps=5,
        save_strategy="steps",
        save_steps=5,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
    )
    trainer.train()  # checkpoints at 5, 10, 15; training goes on to 18 after the last one
    best = load_file(f"{trainer.state.best_model_checkpoint}/model.safetensors")
    for name, p in model.named_parameters():
        assert torch.equal(p, best[name]), name
    trainer.evaluate()
    for name, p in model.named_parameters():
        assert torch.equal(p, best[name]), name


def test_a_run_too_short_for_the_burn_in_is_warned(tmp_path):
    trainer, _ = _trainer(tmp_path, Tiny(), callbacks=[EvaluationWeightsCallback()], max_steps=8)
    with pytest.warns(ScheduleWarning, match=r"burn-in is 3 steps .* this run's 8 steps"):
        trainer.train()
