"""The architectures study: a real quick run end to end, and its verdict rules on summaries whose
answers are known."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("mnist1d")
pytest.importorskip("matplotlib")

from neumann_repro.cli import main
from neumann_repro.studies import architectures as arch
from neumann_repro.study import Settings
from neumann_repro.tuning import FULL_PROTOCOL, Protocol


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("arch")
    argv = ["architectures", "--quick", "--epochs", "2", "--out", str(out), "--no-progress"]
    assert main([*argv, "--results", str(out / "results")]) == 0
    assert not (out / "results").exists()  # quick runs never write the committed results
    return json.loads((out / "architectures" / "results.json").read_text()), out


def test_quick_runs_every_family_and_reaches_the_neumann_phase(quick):
    payload, out = quick
    cells = {r["cell"] for r in payload["runs"]}
    for fam in ("cnn", "gru-clip", "transformer"):
        assert {f"{fam}/{row}" for row in arch.QUICK_ROWS} <= cells
    assert {f"scaling/{row}/{b}" for row in arch.QUICK_SCALING_ROWS for b in (256, 512)} <= cells
    neumann = [r for r in payload["runs"] if r["config"]["optimizer"] == "neumann"]
    assert neumann and all(r["neumann_steps"] > 0 for r in neumann)  # burn-in 1 of 2 epochs
    assert all(r["config"]["warmup_epochs"] == 0 for r in neumann)
    assert all(r["config"]["warmup_epochs"] == 1 for r in payload["runs"] if r["config"]["optimizer"] != "neumann")
    for png in ("test_error.png", "batch_scaling.png"):
        assert (out / "architectures" / png).stat().st_size > 1000


def test_clipping_is_active_on_most_steps_of_the_clipped_gru(quick):
    payload, _ = quick
    clipped = [r for r in payload["runs"] if r["cell"].startswith("gru-clip/")]
    assert clipped and all(r["config"]["clip"] == arch.FAMILIES["gru-clip"]["clip"] for r in clipped)
    fractions = [r["clipped_fraction"] for r in clipped]
    assert all(0.0 <= f <= 1.0 for f in fractions) and sum(fractions) / len(fractions) > 0.5
    assert not any("clip" in r["config"] for r in payload["runs"] if not r["cell"].startswith("gru-clip/"))


def test_batchnorm_variants_and_gradient_scales_are_reported(quick):
    payload, out = quick
    table = (out / "architectures" / "table.md").read_text()
    summary = json.loads((out / "architectures" / "results.json").read_text())["summary"]
    cnn_neumann = [r for r in payload["runs"] if r["cell"] == "cnn/neumann-default"]
    assert all(
        {"test_error_at_w", "test_error_no_bn_update"} <= set(r["history"][-1]) for r in cnn_neumann
    )  # a BatchNorm model: all three evaluations
    others = [r for r in payload["runs"] if r["config"]["model"] != "cnn" or r["config"]["optimizer"] != "neumann"]
    assert others and not any("test_error_at_w" in r["history"][-1] for r in others)
    bn = summary["bn/cnn/neumann-default"]
    chosen = [r for r in cnn_neumann if r["config"]["lr"] == summary["cnn/neumann-default"]["lr"]]
    for where, epoch in (("end", -1), ("mid", 0)):  # 2 epochs: the middle one is the first
        for key, field in arch.BN_KEYS.items():
            expect = sum(r["history"][epoch][field] for r in chosen) / len(chosen)
            assert bn[f"{where}_{key}"] == pytest.approx(expect)
    scales = payload["meta"]["gradient_scales"]
    assert set(scales) == {"cnn", "gru-clip", "transformer"} and all(v > 0 for s in scales.values() for v in s.values())
    assert "blocks.0.attn.in_proj_weight" in scales["transformer"]
    for fam in ("cnn", "gru-clip", "transformer"):
        d = summary[f"{fam}/gradient_decades"]
        vals = scales[fam].values()
        assert d == pytest.approx(math.log10(max(vals) / min(vals)))
        assert summary[f"{fam}/burn_in_share"] == pytest.approx(1 / 2)
    assert "steps clipped" in table and "end: not recomputed" in table and "batch 512" in table
    text = arch.verdict(summary)
    assert "cnn: Neumann (default)" in text and "burn-in 50% of the run" in text and "CNN batch scaling" in text


def _fam(neumann: float, sgd: float, std: float = 0.1) -> dict[str, dict]:
    def row(m: float) -> dict:  # 3 reporting seeds at m - std, m, m + std
        report = [m - std, m, m + std]
        return dict(final_mean=m, final_std=std, seeds=3, report=report, epochs_to_target=None, epochs=40)

    return {"neumann-default": row(neumann), "sgd": row(sgd)}


def _summary(gru: tuple[float, float], clip: tuple[float, float]) -> dict:
    out: dict = {}
    for fam, (n, s) in (("gru", gru), ("gru-clip", clip)):
        out.update({f"{fam}/{k}": v for k, v in _fam(n, s).items()})
        out[f"{fam}/burn_in_share"] = 0.125
    return out


@pytest.mark.parametrize(
    ("gru", "clip", "observed", "explained"),
    [
        # a tie without clipping, 10 points worse with it: no gain, and clipping is what costs it
        ((20.0, 20.0), (30.0, 20.0), "reproduced", "reproduced"),
        # worse either way: clipping changes nothing (the change's 90% interval, -0.21 to +0.21, inside ±0.3)
        ((30.0, 20.0), (30.0, 20.0), "reproduced", "not reproduced"),
        # equivalent within 0.3 points with clipping, but the change (-0.1, 90%: -0.31 to +0.11) is neither a
        # loss nor no change within ±0.3: no evidence either way
        ((20.0, 20.0), (20.1, 20.0), "reproduced", "cannot tell"),
        ((25.0, 20.0), (20.0, 20.0), "reproduced", "not reproduced"),  # clipping helps Neumann to a tie
        ((20.0, 20.0), (15.0, 20.0), "not reproduced", "not reproduced"),  # with clipping Neumann gains
    ],
)
def test_section_4_4_rule(gru, clip, observed, explained):
    """Section 4.4 is two claims: the observation (no gain over the baseline where clipping is on) and
    its explanation (clipping is what costs Neumann: its standing falls when clipping is switched on)."""
    text = arch.verdict(_summary(gru, clip))
    assert "Section 4.4 (GRU, Neumann (default" in text
    obs, expl = text.split("Section 4.4", 1)[1].split("; the explanation", 1)
    assert obs.endswith(f"**{observed}**") and "the observation, no gain" in obs
    assert expl.endswith(f"Holm over 2): **{explained}**")
    change = (clip[1] - clip[0]) - (gru[1] - gru[0])
    assert f"by {change:+.2f} points" in expl
    assert "burn-in 12.5% of the run" in text  # 5 of 40 epochs


def test_family_verdict_names_the_best_baseline_and_the_rule():
    summ = {f"transformer/{k}": v for k, v in _fam(4.0, 3.0).items()}
    summ["transformer/adamw"] = dict(
        final_mean=1.0, final_std=0.1, seeds=3, report=[0.9, 1.0, 1.1], epochs_to_target=20, epochs=40
    )
    summ["transformer/burn_in_share"] = 0.125
    text = arch.verdict(summ)
    # signed so that positive means Neumann is worse, with its interval and Holm's p
    assert "AdamW 1.00%" in text and "Neumann minus AdamW +3.00 (95%: +" in text and "Neumann worse (Holm p = " in text
    assert "none of its epochs" in text


def test_full_settings_are_documented_budgets():
    st = arch.settings(Settings(quick=False))
    fam, sc = st["families"], st["scaling"]
    assert fam["epochs"] == 40 and fam["task"] == "mnist1d-4k" and fam["burn_in_epochs"] is None
    assert sc["batches"] == [128, 256, 512, 1024] and sc["task"] == "mnist1d-36k"
    assert st["protocol"] == Protocol(**FULL_PROTOCOL, final_seeds=6)  # the shared full protocol: 4 reporting seeds
    quick = arch.settings(Settings(quick=True))
    assert quick["families"]["burn_in_epochs"] < quick["families"]["epochs"]  # the Neumann phase is reached
