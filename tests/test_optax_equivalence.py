"""One algorithm, two front ends: neumann_optax (JAX, float64) against the project's float64
reference and against the PyTorch class, step by step, through burn-in, resets and a
learning-rate schedule, to 1e-9."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import neumann_optax
import numpy as np
import optax
import torch
from conftest import ElementwiseProblem, flat
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import RefGroup

from neumann_optimizer import Neumann

jax.config.update("jax_enable_x64", True)

hp_st = st.fixed_dictionaries(
    {
        "burn_in_steps": st.integers(0, 4),
        "reset_steps": st.integers(1, 5),
        "reset_growth": st.sampled_from([1.0, 1.5, 2.0, 3.0]),
        "momentum": st.one_of(st.tuples(st.floats(0.0, 0.6), st.floats(0.6, 0.95)), st.floats(0.0, 0.95)),
        "momentum_ramp_steps": st.floats(0.5, 6.0),
        "cubic_weight": st.floats(0.0, 0.1),
        "repulsive_weight": st.sampled_from([0.0, 1e-6, 1e-4, 1e-3]),
        "ema_decay": st.floats(0.5, 0.999),
        "weight_decay": st.sampled_from([0.0, 0.01]),
        "regularizer_schedule": st.sampled_from(["constant", "lr", 2.0, 3.0]),
    }
)


def _reference(problem: ElementwiseProblem, lr0: float, hp: dict) -> RefGroup:
    mom = hp["momentum"]
    pair = mom if isinstance(mom, tuple) else (mom, mom)
    power = {"constant": 0.0, "lr": 1.0}.get(hp["regularizer_schedule"], hp["regularizer_schedule"])
    return RefGroup(
        w=problem.flat_w0(0),
        lr=lr0,
        burn_in=hp["burn_in_steps"],
        reset0=hp["reset_steps"],
        growth=hp["reset_growth"],
        mu_min=pair[0],
        mu_max=pair[1],
        tau=hp["momentum_ramp_steps"],
        alpha=hp["cubic_weight"],
        beta_per_n=hp["repulsive_weight"],
        gamma=hp["ema_decay"],
        wd=hp["weight_decay"],
        reg_power=float(power),
    )


@settings(max_examples=30, deadline=None)
@given(hp=hp_st, seed=st.integers(0, 2**16), steps=st.integers(8, 30), fused=st.sampled_from([False, None]))
def test_jax_torch_and_reference_trajectories_agree(hp, seed, steps, fused):
    problem = ElementwiseProblem([[(3, 2), (4,), (1,)]], seed)
    rng = np.random.default_rng(seed)
    lrs = np.round(0.1 * rng.uniform(0.2, 1.0, size=steps), 6)  # an arbitrary schedule, one rate per step
    lrs[0] = 0.1  # the initial rate the regularizer schedule is relative to
    # PyTorch: for-loop path (fused=False) or the default (the C kernel on CPU)
    opt = Neumann(problem.params[0], lr=float(lrs[0]), fused=fused, **hp)
    # JAX: the same schedule as an optax schedule of the step count
    table = jnp.asarray(lrs)
    tx = neumann_optax.neumann(lambda count: table[count], **hp)
    w0 = [jnp.asarray(w) for w in problem.w0[0]]
    state = tx.init(w0)
    ref = _reference(problem, float(lrs[0]), hp)

    @jax.jit
    def jstep(params, state, grads):
        u, state = tx.update(grads, state, params)
        return optax.apply_updates(params, u), state

    params = w0
    for k in range(steps):
        for group in opt.param_groups:
            group["lr"] = float(lrs[k])
        problem.set_grads()
        grads = [jnp.asarray(p.grad.numpy()) for p in problem.params[0]]
        ref.step(problem.np_grad(0, ref.w), lr=float(lrs[k]))
        opt.step()
        params, state = jstep(params, state, grads)
        w_jax = np.concatenate([np.asarray(x).ravel() for x in params])
        m_jax = np.concatenate([np.asarray(x).ravel() for x in state.m])
        np.testing.assert_allclose(w_jax, ref.w, rtol=0, atol=1e-9, err_msg=f"step {k + 1}: JAX vs reference")
        np.testing.assert_allclose(m_jax, ref.m, rtol=0, atol=1e-9, err_msg=f"step {k + 1}: JAX m vs reference")
        np.testing.assert_allclose(
            w_jax, flat(problem.params[0]), rtol=0, atol=1e-9, err_msg=f"step {k + 1}: JAX vs torch"
        )
    ev = np.concatenate([np.asarray(x).ravel() for x in neumann_optax.evaluation_params(params, state)])
    np.testing.assert_allclose(ev, ref.eval_weights(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(ev, flat(opt.evaluation_weights().values()), rtol=0, atol=1e-9)
    assert int(state.count) == opt.param_groups[0]["step"] == steps
    assert int(state.next_reset) == opt.param_groups[0]["next_reset"]
    # mu = clip(1 - 1/(1 + t/tau), ...) is computed by XLA and by Python: equal to rounding
    assert math.isclose(float(state.last_momentum), opt.param_groups[0]["last_momentum"], rel_tol=0, abs_tol=1e-12)


def test_defaults_and_argument_names_match_the_pytorch_class():
    import inspect

    jax_sig = inspect.signature(neumann_optax.neumann).parameters
    torch_sig = inspect.signature(Neumann.__init__).parameters
    # total_steps: a warning about the burn-in's share of a run, for PyTorch loops and trainers
    torch_only = {"self", "params", "lr", "nonfinite", "evaluation", "foreach", "fused", "capturable", "total_steps"}
    for name, p in torch_sig.items():
        if name in torch_only:
            continue
        assert name in jax_sig, name
        assert jax_sig[name].default == p.default, name
    assert "learning_rate" in jax_sig


def test_state_round_trips_through_torch_style_numbers():
    """The JAX state after a run holds what the PyTorch optimizer's state dict holds."""
    problem = ElementwiseProblem([[(5,)]], 3)
    hp = dict(burn_in_steps=2, reset_steps=2, momentum_ramp_steps=2.0)
    opt = Neumann(problem.params[0], lr=0.05, **hp)
    tx = neumann_optax.neumann(0.05, **hp)
    params = [jnp.asarray(w) for w in problem.w0[0]]
    state = tx.init(params)
    for _ in range(9):
        problem.set_grads()
        opt.step()
        u, state = tx.update([jnp.asarray(problem.params[0][0].grad.numpy())], state, params)
        params = optax.apply_updates(params, u)
    sd = opt.state_dict()
    np.testing.assert_allclose(np.asarray(state.m[0]), sd["state"][0]["m"].numpy(), atol=1e-12)
    np.testing.assert_allclose(np.asarray(state.v[0]), sd["state"][0]["v"].numpy(), atol=1e-12)
    assert int(state.reset_interval) == sd["param_groups"][0]["reset_interval"]
    assert torch.is_tensor(sd["state"][0]["m"])


def test_parameters_changed_between_steps_meet_a_fresh_norm_in_both_front_ends():
    """Weight averaging or pruning between steps: the next regularized step must use ||w - v|| of
    the parameters as changed. JAX computes the norm from the parameters it is given (by
    construction); the PyTorch CPU kernel carries it from the last pass and must notice the
    change. Both held to the float64 reference through two such edits."""
    hp = dict(burn_in_steps=1, reset_steps=50, reset_growth=2.0, momentum=(0.5, 0.9), momentum_ramp_steps=2.0)
    hp.update(
        cubic_weight=0.05, repulsive_weight=1e-3, ema_decay=0.99, weight_decay=0.0, regularizer_schedule="constant"
    )
    problem = ElementwiseProblem([[(6, 3), (4,)]], 21)
    ref = _reference(problem, 0.05, hp)
    opt = Neumann(problem.params[0], lr=0.05, **hp)  # the default path: the C kernel on CPU
    tx = neumann_optax.neumann(0.05, **hp)
    params = [jnp.asarray(w) for w in problem.w0[0]]
    state = tx.init(params)
    edited = False
    for k in range(12):
        if k in (5, 9):  # the user's edit: halve (averaging) then zero the small entries (pruning)
            edit = (lambda w: 0.5 * w) if k == 5 else (lambda w: np.where(np.abs(w) < 0.3, 0.0, w))
            ref.w = edit(ref.w)
            with torch.no_grad():
                for p in problem.params[0]:
                    p.copy_(torch.as_tensor(edit(p.detach().numpy())))
            params = [jnp.asarray(edit(np.asarray(w))) for w in params]
            edited = True
        problem.set_grads()
        ref.step(problem.np_grad(0, ref.w))
        opt.step()
        u, state = tx.update([jnp.asarray(p.grad.numpy()) for p in problem.params[0]], state, params)
        params = optax.apply_updates(params, u)
        w_jax = np.concatenate([np.asarray(x).ravel() for x in params])
        np.testing.assert_allclose(w_jax, ref.w, rtol=0, atol=1e-9, err_msg=f"step {k + 1}: JAX")
        np.testing.assert_allclose(flat(problem.params[0]), ref.w, rtol=0, atol=1e-9, err_msg=f"step {k + 1}: torch")
    assert edited and opt.step_record()["distance"] > 0


def test_lean_forms_agree_and_neither_keeps_v():
    """Both regularizers 0: the PyTorch class's lean step and neumann-optax's lean form follow one
    trajectory, and neither keeps v."""
    problem = ElementwiseProblem([[(5,), (2, 3)]], 4)
    hp = dict(burn_in_steps=2, reset_steps=3, momentum_ramp_steps=2.0, cubic_weight=0.0, repulsive_weight=0.0)
    opt = Neumann(problem.params[0], lr=0.05, **hp)
    tx = neumann_optax.neumann(0.05, **hp)
    params = [jnp.asarray(w) for w in problem.w0[0]]
    state = tx.init(params)
    for _ in range(12):
        problem.set_grads()
        opt.step()
        u, state = tx.update([jnp.asarray(p.grad.numpy()) for p in problem.params[0]], state, params)
        params = optax.apply_updates(params, u)
    for w, p in zip(params, problem.params[0], strict=True):
        np.testing.assert_allclose(np.asarray(w), p.detach().numpy(), rtol=1e-12, atol=1e-12)
        assert set(opt.state[p]) == {"m"}
    assert state.v is None
