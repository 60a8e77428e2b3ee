"""neumann_optax on its own (JAX and optax only; no torch): the SPEC's identities, optax's
wrappers, one compilation for every phase, sharding, checkpoints and input errors.

The float64 trajectories against the PyTorch class and the project's reference are in the main
test suite (tests/test_optax_equivalence.py), which has torch.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import neumann_optax
import numpy as np
import optax
import pytest
from neumann_optax import NeumannState, evaluation_params, neumann

jax.config.update("jax_enable_x64", True)

HP = dict(burn_in_steps=3, reset_steps=2, momentum_ramp_steps=2.0, cubic_weight=1e-2, repulsive_weight=1e-3)


def problem(seed: int = 0, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    shapes = {"dense": {"kernel": (4, 3), "bias": (3,)}, "out": (5,)}
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s), dtype), shapes, is_leaf=lambda x: isinstance(x, tuple)
    )
    curv = jax.tree.map(lambda p: jnp.asarray(rng.uniform(0.5, 2.0, size=p.shape), dtype), params)

    def loss(p):
        return sum(jnp.sum(c * (w**4 / 4 - w)) for c, w in zip(jax.tree.leaves(curv), jax.tree.leaves(p), strict=True))

    return params, loss


def run(tx, params, loss, steps, jit=True):
    state = tx.init(params)

    def step(params, state):
        g = jax.grad(loss)(params)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    step = jax.jit(step) if jit else step
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def test_state_is_arrays_only_and_one_compilation_serves_every_phase():
    params, loss = problem()
    tx = neumann(0.05, **HP)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)  # runs only while tracing
        u, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, u), state

    state = tx.init(params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
    phases = set()
    for _ in range(20):  # burn-in (3), resets at t = 1, 3, 7, 15, regular steps between
        s = int(state.count) + 1
        t = s - HP["burn_in_steps"]
        phases.add("burn_in" if t <= 0 else ("reset" if t == int(state.next_reset) else "neumann"))
        params, state = step(params, state)
    assert phases == {"burn_in", "reset", "neumann"}
    assert len(traces) == 1
    assert int(state.count) == 20 and int(state.next_reset) == 1 + 2 + 4 + 8 + 16


def test_reduces_to_nesterov_sgd_without_regularizers():
    """alpha = beta = 0, no burn-in, constant mu, no resets after the first: optax's Nesterov SGD
    (``optax.sgd(nesterov=True)``) on the undisplaced weights w - mu m."""
    params, loss = problem(1)
    mu, lr, steps = 0.9, 0.02, 25
    tx = neumann(
        lr,
        burn_in_steps=0,
        reset_steps=10**6,
        momentum=mu,
        momentum_ramp_steps=1,
        cubic_weight=0.0,
        repulsive_weight=0.0,
    )
    p_neu, st = run(tx, params, loss, steps, jit=False)
    # the displaced form's first step is a reset (m = -lr g), which equals Nesterov's first step
    p_sgd, _ = run(optax.sgd(lr, momentum=mu, nesterov=True), params, loss, steps, jit=False)
    np.testing.assert_allclose(flat(p_neu), flat(p_sgd), rtol=0, atol=1e-12)
    assert float(st.last_momentum) == mu
    assert st.v is None  # the lean form: both weights the number 0, no v kept


def test_lean_form_keeps_no_v_unless_the_weights_are_injected():
    """Weights given as the number 0: no v and the same updates as weights injected as arrays
    (which keep v, as the state's shapes are fixed when the transformation is built)."""
    params, loss = problem(2)
    kw = dict(burn_in_steps=2, reset_steps=3, momentum_ramp_steps=2.0, cubic_weight=0.0, repulsive_weight=0.0)
    p_lean, st_lean = run(neumann(0.05, **kw), params, loss, 12, jit=True)
    injected = optax.inject_hyperparams(neumann)(0.05, **kw)
    p_inj, st_inj = run(injected, params, loss, 12, jit=True)
    assert st_lean.v is None and st_inj.inner_state.v is not None
    np.testing.assert_allclose(flat(p_lean), flat(p_inj), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(flat(st_lean.m), flat(st_inj.inner_state.m), rtol=1e-6, atol=1e-6)


def test_evaluation_params_is_w_minus_mu_m_and_pure():
    params, loss = problem(2)
    p, st = run(neumann(0.05, **HP), params, loss, 12)
    ev = evaluation_params(p, st)
    expected = jax.tree.map(lambda w, m: w - st.last_momentum * m, p, st.m)
    np.testing.assert_array_equal(flat(ev), flat(expected))
    np.testing.assert_array_equal(flat(p), flat(run(neumann(0.05, **HP), params, loss, 12)[0]))  # untouched
    # during burn-in m = 0: the evaluation weights are the weights
    p0, st0 = run(neumann(0.05, **HP), params, loss, 2)
    np.testing.assert_array_equal(flat(evaluation_params(p0, st0)), flat(p0))


def test_learning_rate_schedule_is_read_at_the_applied_step_count():
    params, loss = problem(3)
    sched = optax.linear_schedule(0.08, 0.01, 15)
    p1, _ = run(neumann(sched, **HP), params, loss, 15, jit=False)
    # the same by hand: a transformation per step with the schedule's value, state carried over
    state = neumann(0.08, **HP).init(params)
    p2 = params
    for k in range(15):
        g = jax.grad(loss)(p2)
        u, state = neumann(float(sched(jnp.asarray(k, jnp.int32))), **HP).update(g, state, p2)
        state = state._replace(reference_lr=jnp.asarray(0.08))
        p2 = optax.apply_updates(p2, u)
    np.testing.assert_allclose(flat(p1), flat(p2), rtol=0, atol=1e-12)


def test_inside_chain_multisteps_apply_if_finite_and_inject_hyperparams():
    params, loss = problem(4)
    base, _ = run(neumann(0.05, **HP), params, loss, 15)
    # chain with an identity-like clip (large threshold) and a zero weight decay: same trajectory
    chained, st = run(optax.chain(optax.clip_by_global_norm(1e6), neumann(0.05, **HP)), params, loss, 15)
    np.testing.assert_allclose(flat(chained), flat(base), rtol=0, atol=1e-13)
    np.testing.assert_array_equal(
        flat(evaluation_params(chained, st)), flat(evaluation_params(*run(neumann(0.05, **HP), params, loss, 15)))
    )
    # inject_hyperparams: the learning rate becomes state, same trajectory, and can be changed
    inj = optax.inject_hyperparams(neumann)(learning_rate=0.05, **HP)
    p_inj, st_inj = run(inj, params, loss, 15)
    np.testing.assert_allclose(flat(p_inj), flat(base), rtol=0, atol=1e-13)
    assert float(st_inj.hyperparams["learning_rate"]) == 0.05
    np.testing.assert_allclose(
        flat(evaluation_params(p_inj, st_inj)),
        flat(evaluation_params(*run(neumann(0.05, **HP), params, loss, 15))),
        atol=1e-13,
    )
    # MultiSteps(k): k micro-batches with the same gradient = one step on that gradient
    # (its accumulator is float32 by default: float64 here, so the mean of 3 equal gradients is exact)
    tx_ms = optax.MultiSteps(neumann(0.05, **HP), every_k_schedule=3, accumulator_dtype=jnp.float64)
    ms, st_ms = run(tx_ms, params, loss, 45)
    np.testing.assert_allclose(flat(ms), flat(base), rtol=0, atol=1e-12)
    assert int(st_ms.inner_opt_state.count) == 15
    # apply_if_finite: a NaN gradient is skipped and not counted; the trajectory goes on unchanged
    tx = optax.apply_if_finite(neumann(0.05, **HP), max_consecutive_errors=5)
    state = tx.init(params)
    p = params
    for k in range(16):
        g = jax.grad(loss)(p)
        if k == 7:
            g = jax.tree.map(lambda x: x * jnp.nan, g)
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_allclose(flat(p), flat(base), rtol=0, atol=1e-13)
    assert int(state.inner_state.count) == 15 and int(state.total_notfinite) == 1


def test_partition_gives_per_subtree_norms():
    """optax.partition: each subtree is its own block (PyTorch's parameter groups), with its own
    norm and n: the same as running neumann on each subtree alone."""
    params, loss = problem(5)
    labels = {"dense": {"kernel": "a", "bias": "a"}, "out": "b"}
    tx = optax.partition({"a": neumann(0.05, **HP), "b": neumann(0.02, **HP)}, labels)
    p, st = run(tx, params, loss, 14)

    def alone(key, lr):
        sub = params[key]
        sub_loss = lambda q: loss({**params, key: q})  # noqa: E731  (the loss is separable)
        return run(neumann(lr, **HP), sub, sub_loss, 14)

    pa, sa = alone("dense", 0.05)
    pb, sb = alone("out", 0.02)
    np.testing.assert_allclose(flat(p["dense"]), flat(pa), rtol=0, atol=1e-13)
    np.testing.assert_allclose(flat(p["out"]), flat(pb), rtol=0, atol=1e-13)
    ev = evaluation_params(p, st)
    np.testing.assert_allclose(flat(ev["dense"]), flat(evaluation_params(pa, sa)), atol=1e-13)
    np.testing.assert_allclose(flat(ev["out"]), flat(evaluation_params(pb, sb)), atol=1e-13)
    # and differs from one norm over the whole tree (the regularizer couples the leaves)
    whole, _ = run(neumann(0.05, **HP), params, loss, 14)
    assert np.abs(flat(whole["dense"]) - flat(pa)).max() > 1e-9


def test_checkpoint_round_trip_resumes_bit_identically(tmp_path):
    params, loss = problem(6)
    tx = neumann(optax.cosine_decay_schedule(0.05, 20), **HP)
    full, st_full = run(tx, params, loss, 20)
    mid, st_mid = run(tx, params, loss, 9)
    # a plain pytree save: numpy leaves; restore into the structure of a fresh init
    path = tmp_path / "ckpt.pkl"
    path.write_bytes(pickle.dumps([np.asarray(x) for x in jax.tree.leaves((mid, st_mid))]))
    leaves = [jnp.asarray(x) for x in pickle.loads(path.read_bytes())]
    p, st = jax.tree.unflatten(jax.tree.structure((params, tx.init(params))), leaves)
    assert isinstance(st, NeumannState)

    @jax.jit
    def step(params, state):
        u, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, u), state

    for _ in range(11):
        p, st = step(p, st)
    np.testing.assert_array_equal(flat(p), flat(full))
    np.testing.assert_array_equal(flat(st.m), flat(st_full.m))
    np.testing.assert_array_equal(flat(st.v), flat(st_full.v))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_parameters_keep_their_dtype_and_follow_float64(dtype):
    params64, loss = problem(7)
    ref, _ = run(neumann(0.05, **HP), params64, loss, 12)
    params = jax.tree.map(lambda x: x.astype(dtype), params64)
    p, st = run(neumann(0.05, **HP), params, loss, 12)
    assert all(x.dtype == dtype for x in jax.tree.leaves((p, st.m, st.v)))
    tol = 1e-5 if dtype == jnp.float32 else 0.1
    np.testing.assert_allclose(flat(p), flat(ref), atol=tol)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(learning_rate=-0.1, steps_per_epoch=10), "learning_rate"),
        (dict(learning_rate=0.1), "burn_in_steps is not given and neither is steps_per_epoch"),
        (dict(learning_rate=0.1, steps_per_epoch=0), "steps_per_epoch"),
        (dict(learning_rate=0.1, steps_per_epoch=10, burn_in_steps=-1), "burn_in_steps"),
        (dict(learning_rate=0.1, steps_per_epoch=10, reset_steps=0), "reset_steps"),
        (dict(learning_rate=0.1, steps_per_epoch=10, reset_growth=0.0), "reset_growth"),
        (dict(learning_rate=0.1, steps_per_epoch=10, momentum=(0.9, 0.5)), "mu_min <= mu_max"),
        (dict(learning_rate=0.1, steps_per_epoch=10, momentum=1.5), "momentum"),
        (dict(learning_rate=0.1, steps_per_epoch=10, momentum=(0.5, 0.9, 0.1)), "pair"),
        (dict(learning_rate=0.1, steps_per_epoch=10, cubic_weight=float("nan")), "cubic_weight"),
        (dict(learning_rate=0.1, steps_per_epoch=10, repulsive_weight=-1.0), "repulsive_weight"),
        (dict(learning_rate=0.1, steps_per_epoch=10, ema_decay=1.5), "ema_decay"),
        (dict(learning_rate=0.1, steps_per_epoch=10, weight_decay=-0.1), "weight_decay"),
        (dict(learning_rate=0.1, steps_per_epoch=10, regularizer_schedule="cosine"), "regularizer_schedule"),
        (dict(learning_rate=0.1, steps_per_epoch=10, regularizer_schedule=-1.0), "regularizer_schedule"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_culprit(kwargs, match):
    with pytest.raises(ValueError, match=match):
        neumann(**kwargs)


def test_bad_inputs_at_init_and_update():
    tx = neumann(0.1, steps_per_epoch=10)
    with pytest.raises(ValueError, match="complex"):
        tx.init({"w": jnp.ones(3, jnp.complex64)})
    state = tx.init({"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update({"w": jnp.ones(3)}, state)
    with pytest.raises(ValueError, match="no Neumann state"):
        evaluation_params({"w": jnp.ones(3)}, optax.sgd(0.1).init({"w": jnp.ones(3)}))


def test_sharded_parameters_on_four_devices_match_one_device():
    """Parameters sharded over 4 CPU devices (jax.sharding): the global norm reduces across
    devices by itself, and the trajectory equals the unsharded one."""
    code = textwrap.dedent(
        """
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, jax.numpy as jnp, numpy as np, optax
        jax.config.update("jax_enable_x64", True)
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import neumann_optax
        assert len(jax.devices()) == 4
        rng = np.random.default_rng(0)
        params = {"w": jnp.asarray(rng.normal(size=(8, 6))), "b": jnp.asarray(rng.normal(size=(8,)))}
        curv = {"w": jnp.asarray(rng.uniform(0.5, 2, size=(8, 6))), "b": jnp.asarray(rng.uniform(0.5, 2, size=(8,)))}
        loss = lambda p: sum(jnp.sum(c * (w**4 / 4 - w)) for c, w in zip(jax.tree.leaves(curv), jax.tree.leaves(p)))
        tx = neumann_optax.neumann(0.05, burn_in_steps=2, reset_steps=3, momentum_ramp_steps=2.0,
                                   cubic_weight=1e-2, repulsive_weight=1e-3)
        def run(params):
            state = tx.init(params)
            @jax.jit
            def step(p, s):
                u, s = tx.update(jax.grad(loss)(p), s, p)
                return optax.apply_updates(p, u), s
            for _ in range(15):
                params, state = step(params, state)
            return params, state
        plain, _ = run(params)
        mesh = Mesh(np.array(jax.devices()), ("d",))
        sharded = jax.device_put(params, NamedSharding(mesh, P("d")))
        out, state = run(sharded)
        assert len(out["w"].sharding.device_set) == 4, out["w"].sharding
        assert len(state.m["w"].sharding.device_set) == 4
        err = max(float(jnp.abs(out[k] - plain[k]).max()) for k in out)
        assert err < 1e-12, err
        print("OK", err)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK" in res.stdout


def test_importing_never_loads_torch():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch must not be imported')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import jax.numpy as jnp, optax, neumann_optax\n"
        "tx = neumann_optax.neumann(0.1, steps_per_epoch=2)\n"
        "p = {'w': jnp.ones(3)}\n"
        "u, s = tx.update({'w': jnp.ones(3)}, tx.init(p), p)\n"
        "assert 'torch' not in sys.modules\n"
        "print('OK')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
    assert neumann_optax.__version__
