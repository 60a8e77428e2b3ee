"""EvaluationWeights with the real PyTorch Lightning (tiny models, CPU, nothing downloaded)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from neumann_optimizer import Neumann, ScheduleWarning  # noqa: E402
from neumann_optimizer.integrations.lightning import EvaluationWeights  # noqa: E402

N, D = 64, 6


def _data(seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    y = (x[:, 0] - 0.5 * x[:, 1] > 0).long()
    return torch.utils.data.TensorDataset(x, y)


def _loader(seed: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_data(seed), batch_size=16, shuffle=False)


def _expected_eval(opt: Neumann) -> dict[torch.Tensor, torch.Tensor]:
    """w - mu m, from the kept training weights (independent of eval())."""
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            out[p] = st["train_param"].clone().add_(st["m"], alpha=-group["last_momentum"])
    return out


class Net(pl.LightningModule):
    """Burn-in of 2 steps, ramp of 2 steps: the Neumann phase (mu > 0) starts in epoch 1."""

    def __init__(self, batchnorm: bool = False, evaluation: str = "exact") -> None:
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Linear(D, 16)] + ([nn.BatchNorm1d(16)] if batchnorm else []) + [nn.ReLU(), nn.Linear(16, 2)]
        self.net = nn.Sequential(*layers)
        self.evaluation = evaluation
        self.seen: list[dict] = []  # what validation saw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, idx):
        if idx == 0:
            opt = self.trainer.optimizers[0] if self.trainer.optimizers else None
            rec = {"params": [p.detach().clone() for p in self.parameters()]}
            if isinstance(opt, Neumann) and opt.state:
                rec["training"] = opt.training
                exact = self.evaluation == "exact" and not opt.training
                rec["expected"] = list(_expected_eval(opt).values()) if exact else None
            rec["buffers"] = {k: v.clone() for k, v in self.named_buffers()}
            self.seen.append(rec)
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch, _):
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))

    def predict_step(self, batch, _):
        return self(batch[0])

    def configure_optimizers(self):
        return Neumann(
            self.parameters(),
            lr=0.1,
            burn_in_steps=2,
            reset_steps=6,
            momentum_ramp_steps=2,
            evaluation=self.evaluation,
        )


def _trainer(tmp_path, callbacks=(), epochs=4, val=True, **kw) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kw.pop("enable_checkpointing", False),
        limit_val_batches=1.0 if val else 0,
        num_sanity_val_steps=kw.pop("num_sanity_val_steps", 0),
        callbacks=list(callbacks),
        deterministic=True,
        **kw,
    )


def _training_weights(opt: Neumann) -> list[torch.Tensor]:
    """The training weights w, switching the optimizer back to train mode."""
    opt.train()
    return [p.detach().clone() for g in opt.param_groups for p in g["params"]]


def test_validation_sees_evaluation_weights_and_fit_ends_there(tmp_path):
    model = Net()
    trainer = _trainer(tmp_path, [EvaluationWeights()], num_sanity_val_steps=1)
    trainer.fit(model, _loader(), _loader(1))
    stepped = [rec for rec in model.seen if "training" in rec]
    assert stepped, "validation ran after optimizer steps"
    for rec in stepped:
        assert rec["training"] is False
        for p, e in zip(rec["params"], rec["expected"], strict=True):
            assert torch.equal(p, e)
    opt = trainer.optimizers[0]
    assert not opt.training  # fit ended at the evaluation weights
    for p, e in _expected_eval(opt).items():
        assert torch.equal(p, e)
    mu = opt.param_groups[0]["last_momentum"]
    assert mu > 0 and not torch.equal(model.net[0].weight, opt.state[model.net[0].weight]["train_param"])


def test_without_the_callback_validation_sees_training_weights(tmp_path):
    model = Net()
    trainer = _trainer(tmp_path)
    trainer.fit(model, _loader(), _loader(1))
    assert trainer.optimizers[0].training  # nobody switched: what the callback is for


def test_validation_leaves_training_bit_identical(tmp_path):
    a, b = Net(), Net()
    ta = _trainer(tmp_path / "a", [EvaluationWeights()])
    ta.fit(a, _loader(), _loader(1))
    tb = _trainer(tmp_path / "b", [EvaluationWeights()], val=False)
    tb.fit(b, _loader())
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)  # both ended at the same evaluation weights
    for wa, wb in zip(_training_weights(ta.optimizers[0]), _training_weights(tb.optimizers[0]), strict=True):
        assert torch.equal(wa, wb)


class SaveDuringValidation(pl.Callback):
    """Saves a checkpoint while the optimizer is in eval mode (between our hooks)."""

    def __init__(self, path, epoch):
        self.path, self.epoch = path, epoch

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch and not trainer.sanity_checking:
            assert not trainer.optimizers[0].training
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("evaluation", ["exact", "in_place"])
def test_checkpoints_resume_to_the_same_end_in_train_and_eval_mode(tmp_path, evaluation):
    full = Net(evaluation=evaluation)
    eval_ckpt = tmp_path / "eval-mode.ckpt"
    mc = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "mc", save_top_k=-1, every_n_epochs=1)
    t = _trainer(
        tmp_path / "full", [EvaluationWeights(), SaveDuringValidation(eval_ckpt, 1), mc], enable_checkpointing=True
    )
    t.fit(full, _loader(), _loader(1))
    end = [w.clone() for w in _training_weights(t.optimizers[0])]
    train_ckpt = next((tmp_path / "mc").glob("epoch=1-*.ckpt"))
    # the eval-mode checkpoint holds the evaluation weights in its state_dict (for inference)
    sd = torch.load(eval_ckpt, weights_only=True)["state_dict"]
    assert not torch.equal(sd["net.0.weight"], torch.load(train_ckpt, weights_only=True)["state_dict"]["net.0.weight"])
    for ckpt in (train_ckpt, eval_ckpt):
        resumed = Net(evaluation=evaluation)
        t2 = _trainer(tmp_path / f"r-{ckpt.stem}", [EvaluationWeights()])
        t2.fit(resumed, _loader(), _loader(1), ckpt_path=ckpt)
        got = _training_weights(t2.optimizers[0])
        for a, b in zip(end, got, strict=True):
            if evaluation == "exact":
                assert torch.equal(a, b), ckpt.name
            else:  # in place: the switch back rounds once
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_update_bn_uses_evaluation_weights_and_restores_training_statistics(tmp_path):
    model = Net(batchnorm=True)
    before_val: list[dict] = []

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *a):
            before_val.append({k: v.clone() for k, v in pl_module.named_buffers()})

        def on_train_batch_start(self, trainer, pl_module, batch, idx):
            if before_val:  # nothing but validation ran since the last batch: statistics restored
                for k, v in pl_module.named_buffers():
                    assert torch.equal(v, before_val[-1][k]), k

    trainer = _trainer(tmp_path, [Snap(), EvaluationWeights(update_bn=True)], epochs=3)
    trainer.fit(model, _loader(), _loader(1))
    # what validation saw: BatchNorm statistics of the evaluation weights over the training data
    rec = model.seen[-1]
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p, w in zip(ref.parameters(), rec["params"], strict=True):
            p.copy_(w)
    torch.optim.swa_utils.update_bn(_loader(), ref)
    bn = ref.net[1]
    assert torch.allclose(rec["buffers"]["net.1.running_mean"], bn.running_mean, atol=1e-6)
    assert torch.allclose(rec["buffers"]["net.1.running_var"], bn.running_var, atol=1e-6)
    assert not torch.allclose(rec["buffers"]["net.1.running_mean"], before_val[-1]["net.1.running_mean"])
    # after fit: the exported model has the evaluation weights and their statistics
    assert torch.allclose(model.net[1].running_mean, bn.running_mean, atol=1e-6)


def test_test_and_predict_run_at_evaluation_weights(tmp_path):
    model = Net()
    trainer = _trainer(tmp_path, [EvaluationWeights()], epochs=3, val=False)
    trainer.fit(model, _loader())
    opt = trainer.optimizers[0]
    expected = {id(p): e for p, e in _expected_eval(opt).items()}
    preds = trainer.predict(model, _loader(1))
    ref = copy.deepcopy(model.net)
    with torch.no_grad():
        for (_, p), q in zip(model.net.named_parameters(), ref.parameters(), strict=True):
            q.copy_(expected[id(p)])
    x = torch.stack([d[0] for d in _data(1)])
    assert torch.allclose(torch.cat(preds), ref(x), atol=1e-6)
    trainer.test(model, _loader(1))
    for p in model.parameters():
        assert torch.equal(p, expected[id(p)])  # still at the evaluation weights


class Manual(Net):
    """Manual optimization with two optimizers: Neumann for the first layer, SGD for the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, _):
        x, y = batch
        opts = self.optimizers()
        for o in opts:
            o.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        for o in opts:
            o.step()

    def validation_step(self, batch, idx):
        if idx == 0:
            neu, _sgd = self.trainer.optimizers
            self.seen.append(dict(neumann_training=neu.training, last=self.net[2].weight.detach().clone()))

    def configure_optimizers(self):
        return [
            Neumann(self.net[0].parameters(), lr=0.1, burn_in_steps=2, reset_steps=6, momentum_ramp_steps=2),
            torch.optim.SGD(self.net[2].parameters(), lr=0.1, momentum=0.9),
        ]


def test_manual_optimization_with_two_optimizers_switches_only_neumann(tmp_path):
    model = Manual()
    trainer = _trainer(tmp_path, [EvaluationWeights()], epochs=3)
    trainer.fit(model, _loader(), _loader(1))
    assert all(rec["neumann_training"] is False for rec in model.seen)
    neu, sgd = trainer.optimizers
    assert not neu.training
    for p, e in _expected_eval(neu).items():
        assert torch.equal(p, e)
    # the SGD layer is what SGD left: no state of ours, untouched by the switches
    assert "train_param" not in sgd.state[model.net[2].weight]
    assert torch.equal(model.seen[-1]["last"], model.net[2].weight)


def test_a_run_too_short_for_the_burn_in_is_warned(tmp_path):
    # 64 examples / batch 16 = 4 steps an epoch; max_steps 6: the 2-step burn-in is a third of the run
    with pytest.warns(ScheduleWarning, match=r"burn-in is 2 steps .* this run's 6 steps"):
        _trainer(tmp_path, [EvaluationWeights()], max_steps=6, val=False).fit(Net(), _loader())
