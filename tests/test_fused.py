"""The fused paths (the CPU kernel and the torch.compile'd graph) against the for-loop path:
values, not timings."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import DEVICE, ElementwiseProblem

from neumann_optimizer import Neumann, _graph_step, _native, _paths, functional

pytestmark = pytest.mark.slow
HP = dict(lr=0.1, burn_in_steps=2, reset_steps=3, momentum_ramp_steps=2, cubic_weight=0.05, repulsive_weight=1e-3)
# "compiled": fused=True where the CPU kernel does not apply, the device-scheduled graph compiled;
# "capturable": that graph run eagerly (capturable=True)
# (the CPU kernel only where the tensors are: NEUMANN_TEST_DEVICE=cuda runs the other two there)
PATHS = ["native", "compiled", "capturable"] if DEVICE.type == "cpu" else ["compiled", "capturable"]


def _select(monkeypatch, path: str) -> bool | str:
    """``compiled``: the torch.compile'd graph, as where the CPU kernel is unavailable. Returns the
    ``fused`` argument of :func:`_run` that takes the path."""
    if path == "native":
        assert _native.available(), _native.unavailable_reason()
    else:
        monkeypatch.setattr(_native, "available", lambda: False)
        if path == "capturable":
            return "capturable"
    return True


def _run(
    fused: bool | str | None,
    dtype,
    steps=14,
    poke_at=None,
    eval_at=None,
    wd=0.0,
    idle_at=None,
    strided_at=None,
    lean=False,
):
    problem = ElementwiseProblem([[(7, 3), (3,), (1,)], [(4, 4)]], 0, dtype=dtype)
    opt = Neumann(
        [{"params": problem.params[0]}, {"params": problem.params[1], "lr": 0.03}],
        fused=None if fused == "capturable" else fused,
        foreach=None if fused is not False else False,
        capturable=fused == "capturable",
        weight_decay=wd,
        **{**HP, **(dict(cubic_weight=0.0, repulsive_weight=0.0) if lean else {})},
    )
    for i in range(1, steps + 1):
        problem.set_grads()
        if i == idle_at:  # one parameter without a gradient on this step
            problem.params[0][1].grad = None
        if i == strided_at:  # a non-contiguous gradient: this step leaves the CPU kernel
            g = problem.params[0][0].grad
            problem.params[0][0].grad = g.t().contiguous().t()
        opt.step()
        if i == eval_at:
            opt.eval()
            opt.train()
        if i == poke_at:  # an in-place change of the weights outside the optimizer
            with torch.no_grad():
                problem.params[0][0].mul_(1.01)
    return problem, opt


CASES = {"plain": {}, "eval_train": {"eval_at": 7}, "poked": {"poke_at": 8}, "weight_decay": {"wd": 0.01}}
CASES["no_grad_once"] = {"idle_at": 9}
CASES["strided_grad_once"] = {"strided_at": 8}
CASES["lean"] = {"lean": True, "wd": 0.01}  # both regularizers 0: no v, no norm


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_matches_for_loop(path, dtype, case, monkeypatch):
    kw = CASES[case]
    pa, oa = _run(False, dtype, **kw)
    pb, ob = _run(_select(monkeypatch, path), dtype, **kw)
    # the kernel ran (or did not); the lean step carries no norm; the device schedule was used
    assert any(ob._carried.values()) == (path == "native" and not kw.get("lean"))
    assert bool(ob._sched) == (path != "native")
    assert [g["step"] for g in oa.param_groups] == [g["step"] for g in ob.state_dict()["param_groups"]]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for ga, gb in zip(pa.params, pb.params, strict=True):
        for a, b in zip(ga, gb, strict=True):
            torch.testing.assert_close(a, b, **tol)
            torch.testing.assert_close(oa.state[a]["m"], ob.state[b]["m"], **tol)
            if kw.get("lean"):
                assert "v" not in oa.state[a] and "v" not in ob.state[b]
            else:
                torch.testing.assert_close(oa.state[a]["v"], ob.state[b]["v"], **tol)
    assert not ob._fused_failed


@pytest.mark.parametrize("path", PATHS)
def test_fused_resume_is_identical(path, tmp_path, monkeypatch):
    fused = _select(monkeypatch, path)
    full_problem, full = _run(fused, torch.float64, steps=12)
    problem = ElementwiseProblem([[(7, 3), (3,), (1,)], [(4, 4)]], 0)
    kw = dict(capturable=True) if fused == "capturable" else dict(fused=True)
    opt = Neumann([{"params": problem.params[0]}, {"params": problem.params[1], "lr": 0.03}], **kw, **HP)
    for _ in range(7):
        problem.set_grads()
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    opt2 = Neumann([{"params": problem.params[0]}, {"params": problem.params[1], "lr": 0.03}], **kw, **HP)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for _ in range(5):
        problem.set_grads()
        opt2.step()
    for ga, gb in zip(full_problem.params, problem.params, strict=True):
        for a, b in zip(ga, gb, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
            torch.testing.assert_close(full.state[a]["m"], opt2.state[b]["m"], rtol=1e-13, atol=1e-14)


def _one_step_each(fused: bool, dtype=torch.float64):
    problem = ElementwiseProblem([[(7, 3), (3,)]], 0, dtype=dtype)
    opt = Neumann(problem.params[0], fused=fused, foreach=None if fused else True, **HP)
    problem.set_grads()
    return problem, opt


def test_fused_falls_back_when_compilation_fails(monkeypatch):
    """Inductor's compiler fails (as without a C compiler): the step falls back once, loudly (that
    step runs the graph eagerly, later ones the multi-tensor path), and is applied exactly once."""
    import torch._inductor.compile_fx as compile_fx_module

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C compiler here (injected)")

    _select(monkeypatch, "compiled")
    monkeypatch.setattr(_graph_step, "_COMPILED", {})  # fresh code objects: dynamo compiles anew
    monkeypatch.setattr(compile_fx_module, "compile_fx", no_compiler)
    ref_problem, ref = _one_step_each(False)
    ref.step()
    problem, opt = _one_step_each(True)
    with pytest.warns(RuntimeWarning, match="falling back"):
        opt.step()
    assert opt._fused_failed
    assert opt.state_dict()["param_groups"][0]["step"] == 1
    for a, b in zip(ref_problem.params[0], problem.params[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)  # applied once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        problem.set_grads()
        opt.step()  # no second warning


def test_failure_while_the_compiled_step_runs_propagates(monkeypatch):
    """An error raised while the compiled graph runs (out of memory, say) is not a compilation
    failure: it propagates, nothing is applied a second time, and the path stays on."""
    _select(monkeypatch, "compiled")
    real = _graph_step._compiled

    def fails_after_writing(key):
        fn = real(key)

        def run(*args):
            fn(*args)  # the graph has written the step ...
            raise torch.OutOfMemoryError("injected after the graph wrote its outputs")  # ... then fails

        return run

    ref_problem, ref = _one_step_each(False)
    ref.step()
    problem, opt = _one_step_each(True)
    monkeypatch.setattr(_graph_step, "_compiled", fails_after_writing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(torch.OutOfMemoryError, match="injected"):
            opt.step()
    assert not [w for w in caught if "falling back" in str(w.message)]
    assert not opt._fused_failed
    for a, b in zip(ref_problem.params[0], problem.params[0], strict=True):
        # as the error found them: the step applied once, not twice (a second would move by lr g)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the host counters did not advance; the device schedule, which the graph wrote, did with the weights
    assert opt.param_groups[0]["step"] == 0
    assert opt.state_dict()["param_groups"][0]["step"] == 1


def test_default_path_choice():
    opt = Neumann([torch.nn.Parameter(torch.zeros(10))], lr=0.1, **{k: v for k, v in HP.items() if k != "lr"})
    assert _paths.device_scheduled(opt, 0, opt.param_groups[0]["params"]) is None
    # the CPU kernel: the default on CPU, and for fused=True; not for an explicit foreach choice
    for kwargs, native in [({}, True), ({"fused": True}, True), ({"foreach": True}, False), ({"fused": False}, False)]:
        p = torch.nn.Parameter(torch.ones(10))
        opt = Neumann([p], lr=0.1, **{k: v for k, v in HP.items() if k != "lr"}, **kwargs)
        p.grad = torch.ones(10)
        opt.step()
        assert any(opt._carried.values()) == native, kwargs


def test_native_kernel_carries_the_norm(monkeypatch):
    """The norm of a regular step comes from the previous pass; summed afresh only when a tensor
    changed outside the optimizer (version counter), a parameter missed a gradient, or after
    load_state_dict."""
    calls = []
    real = _native.squared_distance
    monkeypatch.setattr(_native, "squared_distance", lambda *a: calls.append(1) or real(*a))
    _run(True, torch.float64, steps=14)
    assert calls == []  # burn-in 2, resets at t = 1, 4, 10: every regular step used the carry
    _run(True, torch.float64, steps=14, poke_at=8)
    assert len(calls) == 1
    _run(True, torch.float64, steps=14, idle_at=9)
    assert len(calls) == 3  # the step without the gradient (another set of tensors) and the next
    problem, opt = _run(True, torch.float64, steps=6)
    opt.load_state_dict(opt.state_dict())
    problem.set_grads()
    opt.step()  # a regular step (t = 5): both groups sum afresh
    assert len(calls) == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_all_finite(dtype):
    sizes = [5, 70_001, 1, 40_000, 3]  # the split between the two threads falls inside a tensor
    grads = [torch.randn(n, dtype=dtype) for n in sizes]
    assert _native.all_finite(grads)
    for bad in (float("inf"), float("-inf"), float("nan")):
        for ti, pos in [(0, 0), (1, 0), (1, 35_000), (1, 70_000), (2, 0), (3, 39_999), (4, 2)]:
            grads[ti][pos] = bad
            assert not _native.all_finite(grads), (bad, ti, pos)
            grads[ti][pos] = 0.5
    assert _native.all_finite(grads)


def test_native_step_sums_the_next_norm():
    g = torch.Generator().manual_seed(3)
    shapes = [(300, 200), (7,), (50_001,)]
    w, grad, m, v = ([torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(4))
    for phase in ("burn_in", "reset", "neumann"):
        sq = _native.step(w, grad, m, v, phase=phase, lr=0.1, momentum=0.7, coef=0.2, keep=0.01, weight_decay=0.001)
        assert sq == pytest.approx(sum(float(((a - b) ** 2).sum()) for a, b in zip(w, v, strict=True)), rel=1e-12)
        assert _native.squared_distance(w, v) == pytest.approx(sq, rel=1e-12)


def test_native_unavailable_falls_back_quietly(monkeypatch, tmp_path):
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setenv("NEUMANN_OPTIMIZER_CACHE", str(tmp_path))
    monkeypatch.setattr(_native, "_compiler", lambda: "false")  # a "compiler" that always fails
    assert not _native.available()
    assert "false" in _native.unavailable_reason()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pb, ob = _run(None, torch.float64)  # the default: the for-loop path for this small model
    pa, _ = _run(False, torch.float64)
    assert not any(ob._carried.values())
    for ga, gb in zip(pa.params, pb.params, strict=True):
        for a, b in zip(ga, gb, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 3, 4])
def test_native_step_is_the_same_on_any_thread_count(threads):
    """Each element's update is independent of the split between threads: bit-identical."""
    g = torch.Generator().manual_seed(4)
    shapes = [(70_001,), (3,), (40_000,), (5, 7)]
    tensors = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    copies = [[t.clone() for t in ts] for ts in tensors]
    kw = dict(phase="neumann", lr=0.1, momentum=0.7, coef=0.2, keep=0.01, weight_decay=0.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        sq_a = _native.step(*tensors, **kw)
        torch.set_num_threads(threads)
        sq_b = _native.step(*copies, **kw)
    finally:
        torch.set_num_threads(before)
    for ts, cs in zip(tensors, copies, strict=True):
        for t, c in zip(ts, cs, strict=True):
            assert torch.equal(t, c)
    assert sq_b == pytest.approx(sq_a, rel=1e-5)


def test_many_groups_of_equal_counts_and_other_shapes_compile_apart(monkeypatch):
    """Nine groups of two tensors each, every group of other shapes, on the compiled path: each gets
    a graph of its own (a shared one would recompile per group and reach dynamo's recompile limit,
    8), and the step equals the multi-tensor path's."""
    _select(monkeypatch, "compiled")
    monkeypatch.setattr(_graph_step, "_COMPILED", {})
    groups = [[torch.randn(k + 2, 3, dtype=torch.float64), torch.randn(k + 2, dtype=torch.float64)] for k in range(9)]
    made = [[torch.nn.Parameter(t.clone()) for t in g] for g in groups]
    twin = [[torch.nn.Parameter(t.clone()) for t in g] for g in groups]
    kw = dict(lr=0.1, burn_in_steps=100, reset_steps=3, momentum_ramp_steps=2)  # burn-in: one phase
    opt = Neumann([{"params": ps} for ps in made], fused=True, **kw)
    ref = Neumann([{"params": ps} for ps in twin], foreach=True, **kw)
    for _ in range(2):
        for ps in (*made, *twin):
            for p in ps:
                p.grad = torch.sin(p.detach())
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback to the multi-tensor path
            opt.step()
        ref.step()
    assert len(_graph_step._COMPILED) == 9 and not opt._fused_failed
    for ps, qs in zip(made, twin, strict=True):
        for p, q in zip(ps, qs, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_device_compiled_path_compiles_one_graph_per_group_for_the_whole_schedule(monkeypatch):
    """fused=True on the device schedule (as on accelerators): through burn-in, the momentum ramp,
    several resets and skipped steps, with LambdaLR changing lr every step, each group compiles one
    graph and never recompiles (dynamo's error_on_recompile), and the run equals the multi-tensor
    path's."""
    kw = dict(burn_in_steps=3, reset_steps=4, momentum_ramp_steps=3, cubic_weight=0.05, repulsive_weight=1e-3)

    def run(fused):
        problem = ElementwiseProblem([[(7, 3), (3,)], [(4, 4)]], 0)
        opt = Neumann(
            [{"params": problem.params[0]}, {"params": problem.params[1], "lr": 0.03}],
            lr=0.1,
            fused=fused,
            foreach=None if fused else True,
            **kw,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.05 * s))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skip warnings
            for i in range(40):
                problem.set_grads()
                if i in (5, 17):
                    problem.params[1][0].grad[0, 0] = float("nan")
                opt.step()
                sched.step()
            return problem, opt, opt.state_dict()

    pa, _, sa = run(False)
    _select(monkeypatch, "compiled")
    monkeypatch.setattr(_graph_step, "_COMPILED", {})
    with torch._dynamo.config.patch(error_on_recompile=True):
        pb, ob, sb = run(True)
    assert len(_graph_step._COMPILED) == 2 and not ob._fused_failed
    keys = ("step", "skipped_steps", "next_reset", "reset_interval")
    assert [[g[k] for k in keys] for g in sa["param_groups"]] == [[g[k] for k in keys] for g in sb["param_groups"]]
    assert [g["skipped_steps"] for g in sb["param_groups"]] == [0, 2]
    for ga, gb in zip(pa.params, pb.params, strict=True):
        for a, b in zip(ga, gb, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["for-loop", "foreach", "compiled", "capturable"])
def test_low_precision_gradients_whose_norm_overflows_still_step(path, dtype, monkeypatch):
    """Every entry finite, but the gradient's L1 norm (3e5, and 1.2e6 for the wider tensor) is far past
    float16's 65,504: the finite check must not read that as inf and skip every step."""
    fused = _select(monkeypatch, path) if path not in ("for-loop", "foreach") else False
    foreach = {"for-loop": False, "foreach": True}.get(path)
    ps = [torch.zeros(300_000, dtype=dtype, device=DEVICE, requires_grad=True)]
    ps.append(torch.zeros(1_000, 1_200, dtype=dtype, device=DEVICE))
    ps[1].requires_grad_(True)
    opt = Neumann(ps, fused=fused if fused is True else None, foreach=foreach, capturable=fused == "capturable", **HP)
    for _ in range(4):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
    group = opt.state_dict()["param_groups"][0]  # (reads the device counters where a step kept them there)
    assert (group["step"], group["skipped_steps"]) == (4, 0)
    # the same four steps in float64 (the for-loop path; its finite check cannot overflow there)
    ref_ps = [torch.zeros(p.shape, dtype=torch.float64, device=DEVICE, requires_grad=True) for p in ps]
    ref = Neumann(ref_ps, foreach=False, **HP)
    for _ in range(4):
        for p in ref_ps:
            p.grad = torch.ones_like(p)
        ref.step()
    for p, r in zip(ps, ref_ps, strict=True):
        assert float(p.reshape(-1)[0]) == pytest.approx(float(r.reshape(-1)[0]), rel=2e-2)


@pytest.mark.parametrize("path", [*PATHS, "foreach", "for-loop"])
def test_every_path_steps_through_the_one_functional_entry(path, monkeypatch):
    """``functional.neumann`` is the only update ``Neumann.step`` calls, on every path: once per group
    and step, with the device schedule exactly where the path keeps one."""
    calls: list[bool] = []
    real = functional.neumann

    def counted(*args, **kwargs):
        calls.append(kwargs.get("schedule") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(functional, "neumann", counted)
    if path == "foreach":
        monkeypatch.setattr(_native, "available", lambda: False)
    fused = (
        {"foreach": None, "for-loop": False}.get(path)
        if path in ("foreach", "for-loop")
        else _select(monkeypatch, path)
    )
    _run(fused, torch.float64, steps=6)
    assert len(calls) == 2 * 6  # two groups, six steps
    assert set(calls) == {path in ("compiled", "capturable")}
    with pytest.raises(TypeError, match="phase"):
        real([], [], [], None)
