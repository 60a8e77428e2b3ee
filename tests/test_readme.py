"""The README's commands and quick start, the integration snippets (docs/INTEGRATIONS.md) and the
JAX example (neumann-optax/README.md) run as written."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quickstart_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quickstart_is_the_example_file():
    example = (ROOT / "examples" / "quickstart.py").read_text()
    assert _quickstart_block().strip() in example


def test_readme_quickstart_trains():
    pytest.importorskip("mnist1d")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_quickstart_block(), "README-quickstart", "exec"), {"__name__": "__readme__"})
    acc = float(re.search(r"test accuracy: ([0-9.]+)", out.getvalue()).group(1))
    assert acc > 0.45  # chance is 0.10


def test_ci_runs_the_readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up \(two commands\).*?```bash\n(.*?)```", text, re.S).group(1)
    commands = [c for c in block.strip().splitlines() if c.strip()]
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text()
    for c in commands:
        assert c in ci


def _integration_blocks() -> list[str]:
    text = (ROOT / "docs" / "INTEGRATIONS.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _run_block(code: str, tmp_path, monkeypatch) -> tuple[dict, str]:
    monkeypatch.chdir(tmp_path)  # a fresh directory, as a new user's script would write into
    out = io.StringIO()
    scope: dict = {"__name__": "__readme__"}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README-integration", "exec"), scope)
    return scope, out.getvalue()


def _accuracy(printed: str) -> float:
    return float(re.search(r"accuracy at the evaluation weights: ([0-9.]+)", printed).group(1))


def test_readme_has_the_three_integration_snippets():
    blocks = _integration_blocks()
    assert len(blocks) == 3
    assert "EvaluationWeights()" in blocks[0] and "EvaluationWeightsCallback()" in blocks[1]
    assert "accelerator.prepare" in blocks[2]


def test_readme_lightning_snippet_trains_and_exports_evaluation_weights(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    import torch

    scope, printed = _run_block(_integration_blocks()[0], tmp_path, monkeypatch)
    assert _accuracy(printed) > 0.8  # chance is about 0.6
    assert [p.name for p in tmp_path.iterdir()] == ["classifier.pt"]  # no stray checkpoints/ or logs
    opt = scope["trainer"].optimizers[0]
    assert not opt.training and opt.param_groups[0]["last_momentum"] > 0
    saved = torch.load(tmp_path / "classifier.pt", weights_only=True)
    for name, p in scope["model"].named_parameters():
        w = opt.state[p]["train_param"]  # w - mu m, computed as eval() does (one fused multiply-add)
        assert torch.equal(saved[name], w.clone().add_(opt.state[p]["m"], alpha=-opt.param_groups[0]["last_momentum"]))


def test_readme_hf_snippet_trains_and_exports_evaluation_weights(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import torch
    from safetensors.torch import load_file

    scope, printed = _run_block(_integration_blocks()[1], tmp_path, monkeypatch)
    metrics = eval(re.search(r"(\{.*'eval_loss'.*\})", printed).group(1))  # the printed dict
    assert metrics["eval_loss"] < 0.45  # chance-level loss is about 0.67
    opt = scope["opt"]
    assert not opt.training
    saved = load_file(str(tmp_path / "hf-out" / "final" / "model.safetensors"))
    mu = opt.param_groups[0]["last_momentum"]
    for name, p in scope["model"].named_parameters():  # w - mu m, computed as eval() does
        assert torch.equal(saved[name], opt.state[p]["train_param"].clone().add_(opt.state[p]["m"], alpha=-mu))


def test_readme_hf_optimizer_cls_and_kwargs_works(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    code = _integration_blocks()[1].split("model = Classifier()")[0]
    code += (
        "model = Classifier()\n"
        "trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,\n"
        "    optimizer_cls_and_kwargs=(Neumann, {'lr': 0.1, 'steps_per_epoch': steps_per_epoch}),\n"
        "    callbacks=[EvaluationWeightsCallback()])\n"
        "trainer.train()\n"
    )
    assert 'optimizer_cls_and_kwargs=(Neumann, {"lr": 0.1, "steps_per_epoch": steps_per_epoch})' in (
        ROOT / "docs" / "INTEGRATIONS.md"
    ).read_text().replace("\n", " ")
    scope, _ = _run_block(code, tmp_path, monkeypatch)
    from neumann_optimizer import Neumann

    opt = scope["trainer"].optimizer
    inner = getattr(opt, "optimizer", opt)
    assert isinstance(inner, Neumann) and not inner.training  # built by the Trainer, left at w - mu m


def test_readme_accelerate_snippet_trains_and_saves_evaluation_weights(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    scope, printed = _run_block(_integration_blocks()[2], tmp_path, monkeypatch)
    assert _accuracy(printed) > 0.8
    assert not scope["opt"].optimizer.training


def test_readme_jax_block_runs_and_learns():
    """neumann-optax's README example, run as written: loss at the evaluation weights below chance's."""
    pytest.importorskip("optax")
    section = (ROOT / "neumann-optax" / "README.md").read_text().split("## In full", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README-jax", "exec"), {"__name__": "__readme__"})
    loss = float(re.search(r"evaluation weights: ([0-9.]+)", out.getvalue()).group(1))
    assert loss < 1.0  # log(10) = 2.30 at chance


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_links_resolve():
    """Every relative link of the README (and of the docs it sends readers to) names a file that
    exists, and every #anchor a heading of that file."""
    for doc in ("README.md", "docs/WHEN_TO_USE.md", "docs/INTEGRATIONS.md", "neumann-repro/README.md"):
        path = ROOT / doc
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            assert dest.exists(), (doc, target)
            if anchor:
                headings = re.findall(r"^#+ (.+)$", dest.read_text(), re.M)
                assert anchor in {_slug(h) for h in headings}, (doc, target)


def test_readme_first_screen_answers_should_i_use_it():
    """Lines 1-40: what it is, should you use it, the two commands, and how to start (the rate,
    steps_per_epoch, the burn-in's length, eval()/train()); the algorithm's vocabulary comes later."""
    lines = (ROOT / "README.md").read_text().splitlines()
    first = "\n".join(lines[:40])
    for heading in ("## Should you use it?", "## Set up (two commands)", "## Quick start"):
        assert heading in first, heading
    for start in ("lr=0.3", "steps_per_epoch=len(loader)", "first 5 epochs are plain SGD", "opt.eval()", "opt.train()"):
        assert start in first, start
    for jargon in ("displaced", "w \u2212 \u03bcm", "OCR"):  # (w - mu m, as the README writes it)
        assert jargon not in first, jargon
    assert len(lines) <= 300


def test_readme_lines_fit_120_columns_outside_code_and_tables():
    code, long = False, []
    for i, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1):
        if line.startswith("```"):
            code = not code
        elif not code and not line.startswith("|") and len(line) > 120:
            long.append(i)
    assert not long, long


def test_should_you_use_it_numbers_come_from_the_rendered_results():
    """Each number of the README's table is in docs/REPRODUCTION.md, which `neumann-repro report`
    renders from the committed results (a test holds that file to them)."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## The evidence", 1)[1].split("\n## ", 1)[0]
    report = (ROOT / "docs" / "REPRODUCTION.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| [")]
    assert len(rows) >= 8
    for row in rows:
        cells = row.split("|")[2:4]  # Neumann (default), best baseline
        for number in re.findall(r"\d[\d,]*\.\d+(?: ± \d+\.\d+)?|\d{1,3},\d{3}", " ".join(cells)):
            assert number in report, (number, row)


def test_readme_rates_come_from_the_rendered_rate_table():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Learning rates by batch size", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")]
    batches, safe, nxt = ([c.strip() for c in row[1:]] for row in rows)
    report = (ROOT / "docs" / "REPRODUCTION.md").read_text()
    rendered = report.split("## Learning rates by batch size", 1)[1].split("\n## ", 1)[0]
    for b, lr, up in zip(batches, safe, nxt, strict=True):
        assert re.search(rf"^\| {re.escape(b)} \| {re.escape(lr)} \| \d+ \| {re.escape(up)} \|$", rendered, re.M), b


def test_readme_noise_scale_example_runs():
    import torch

    from neumann_optimizer import Neumann

    section = (ROOT / "README.md").read_text().split("## Watching it train", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.manual_seed(0)
    x, y = torch.randn(512, 10), torch.randint(0, 3, (512,))
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    scope = {
        "torch": torch,
        "model": model,
        "opt": Neumann(model.parameters(), lr=0.1, steps_per_epoch=4),
        "loader": torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=128),
    }
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README-noise-scale", "exec"), scope)
    assert scope["acc"].steps == 4 and "B_simple ~" in out.getvalue()
