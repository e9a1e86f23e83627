"""SFPO transform: the three stages against an explicit float64 NumPy loop, K = 0 bit for bit, memory, errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sfpo_jax.optim import SFPOState, calls_per_batch, sfpo, sfpo_active

SHAPES = {"b": (3,), "w": (2, 4)}  # leaves in jax.tree order (sorted keys)
DIM = sum(int(np.prod(s)) for s in SHAPES.values())
NUM_BATCHES = 3
LR = 0.05


# ---------------------------------------------------------------- float64 NumPy reference


def quadratic_data(num_batches: int, num_minibatches: int, seed: int = 0):
    """Per (batch, mini-batch): A [5, DIM], y [5]; the loss is 0.5·||A θ − y||²."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(num_batches, num_minibatches, 5, DIM)), rng.normal(size=(num_batches, num_minibatches, 5))


def np_grad(theta, a, y):
    return a.T @ (a @ theta - y)


class NpSGD:
    def __init__(self):
        self.lr = LR

    def __call__(self, g, theta):
        return -self.lr * g


class NpAdamW:
    """optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2), written out."""

    def __init__(self, clip: float | None = None):
        self.m = self.v = 0.0
        self.t = 0
        self.clip = clip

    def __call__(self, g, theta):
        if self.clip is not None:
            norm = np.sqrt(np.sum(g * g))
            g = g if norm < self.clip else g / norm * self.clip
        self.t += 1
        self.m = 0.9 * self.m + 0.1 * g
        self.v = 0.999 * self.v + 0.001 * g * g
        m_hat, v_hat = self.m / (1 - 0.9**self.t), self.v / (1 - 0.999**self.t)
        return -LR * (m_hat / (np.sqrt(v_hat) + 1e-8) + 1e-2 * theta)


NP_INNER = {"sgd": NpSGD, "adamw": NpAdamW, "clip_adamw": functools.partial(NpAdamW, clip=0.5)}
OPTAX_INNER = {
    "sgd": lambda: optax.sgd(LR),
    "adamw": lambda: optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2),
    "clip_adamw": lambda: optax.chain(
        optax.clip_by_global_norm(0.5), optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2)
    ),
}


def reference_trajectory(
    inner, theta, data, num_fast_steps, alphas, num_minibatches, slow_correction=True, plain_after=None
):
    """The three stages, one epoch of M inner steps per arrow; returns θ after every batch.

    ``slow_correction=False`` drops stage III (the batch ends at θ̃); batches after ``plain_after`` (the batch
    whose entropy switched SFPO off) are one plain epoch.
    """
    a_all, y_all = data

    def epoch(theta, b):
        for j in range(num_minibatches):
            theta = theta + inner(np_grad(theta, a_all[b, j], y_all[b, j]), theta)
        return theta

    out = []
    for b in range(a_all.shape[0]):
        if plain_after is not None and b > plain_after:
            theta = epoch(theta, b)  # switched to GRPO
            out.append(theta.copy())
            continue
        slow = theta.copy()
        for _ in range(num_fast_steps):  # stage I: fast trajectory
            theta = epoch(theta, b)
        theta = slow + alphas[b] * (theta - slow)  # stage II: reposition
        if slow_correction:
            theta = epoch(theta, b)  # stage III: slow correction
        out.append(theta.copy())
    return np.stack(out)


def flatten(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])


def unflatten(vec) -> dict:
    out, i = {}, 0
    for k, s in SHAPES.items():
        n = int(np.prod(s))
        out[k] = jnp.asarray(vec[i : i + n].reshape(s))
        i += n
    return out


def jax_grad(params, a, y):
    theta = jnp.concatenate([params[k].ravel() for k in SHAPES])
    g = a.T @ (a @ theta - y)
    return unflatten_jnp(g)


def unflatten_jnp(vec):
    out, i = {}, 0
    for k, s in SHAPES.items():
        n = int(np.prod(s))
        out[k] = vec[i : i + n].reshape(s)
        i += n
    return out


@functools.cache
def x64_step(
    inner_name: str,
    num_fast_steps: int,
    num_minibatches: int,
    slow_correction: bool = True,
    entropy_window: int | None = 30,
):
    """One jitted update + apply, alpha a traced argument so that every alpha reuses one compilation."""

    def step(params, state, a, y, alpha, entropy):
        tx = optax.chain(
            OPTAX_INNER[inner_name](),
            sfpo(num_fast_steps, alpha, num_minibatches, entropy_window, slow_correction=slow_correction),
        )
        extra = {} if entropy is None else {"entropy": entropy}
        updates, state = tx.update(jax_grad(params, a, y), state, params, **extra)
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


def run_transform(
    inner_name,
    theta0,
    data,
    num_fast_steps,
    alpha,
    num_minibatches,
    schedule=None,
    slow_correction=True,
    entropies=None,
    entropy_window=30,
):
    """Drive chain(inner, sfpo) the way a training loop does; returns params after every batch (float64), the
    final state and the calls made per batch. ``entropies[b]`` is passed at every call of batch ``b``."""
    a_all, y_all = data
    tx = optax.chain(
        OPTAX_INNER[inner_name](),
        sfpo(num_fast_steps, schedule or alpha, num_minibatches, entropy_window, slow_correction=slow_correction),
    )
    params = unflatten(theta0)
    state = tx.init(params)
    if schedule is None:
        step = x64_step(inner_name, num_fast_steps, num_minibatches, slow_correction, entropy_window)
        call = lambda p, s, a, y, h: step(p, s, a, y, jnp.float64(alpha), h)
    else:
        update = jax.jit(tx.update)

        def call(p, s, a, y, h):
            u, s = update(jax_grad(p, a, y), s, p, **({} if h is None else {"entropy": h}))
            return optax.apply_updates(p, u), s

    out, calls = [], []
    for b in range(a_all.shape[0]):
        n = calls_per_batch(state)
        calls.append(n)
        h = None if entropies is None else jnp.float32(entropies[b])
        for i in range(n):
            j = i % num_minibatches
            params, state = call(params, state, jnp.asarray(a_all[b, j]), jnp.asarray(y_all[b, j]), h)
            if i < n - 1:  # counts down inside the batch; the last call starts the next cycle
                assert calls_per_batch(state) == n - 1 - i
        out.append(flatten(params))
    return np.stack(out), state, calls


# ---------------------------------------------------------------- trajectories to 1e-9


@pytest.mark.parametrize("inner_name", ["sgd", "adamw", "clip_adamw"])
@pytest.mark.parametrize("num_fast_steps", [0, 1, 3])
@pytest.mark.parametrize("num_minibatches", [1, 2, 4])
def test_matches_float64_reference(inner_name, num_fast_steps, num_minibatches):
    data = quadratic_data(NUM_BATCHES, num_minibatches)
    theta0 = np.random.default_rng(1).normal(size=DIM)
    with jax.enable_x64(True):
        for alpha in (0.0, 0.5, 0.8, 1.0):
            got, state, calls = run_transform(inner_name, theta0, data, num_fast_steps, alpha, num_minibatches)
            assert calls == [(num_fast_steps + 1) * num_minibatches] * NUM_BATCHES
            want = reference_trajectory(
                NP_INNER[inner_name](), theta0.copy(), data, num_fast_steps, [alpha] * NUM_BATCHES, num_minibatches
            )
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=f"alpha={alpha}")
            sfpo_state = next(s for s in state if isinstance(s, SFPOState))
            assert int(sfpo_state.num_batches) == NUM_BATCHES and int(sfpo_state.count) == 0


@pytest.mark.parametrize("inner_name", ["sgd", "adamw"])
def test_alpha_schedule_is_read_at_the_batch_count(inner_name):
    num_batches, num_fast_steps, num_minibatches = 4, 2, 2
    data = quadratic_data(num_batches, num_minibatches, seed=3)
    theta0 = np.random.default_rng(4).normal(size=DIM)
    schedule = optax.linear_schedule(init_value=1.0, end_value=0.25, transition_steps=3)
    with jax.enable_x64(True):
        got, _, _ = run_transform(inner_name, theta0, data, num_fast_steps, None, num_minibatches, schedule=schedule)
        # The transform reads the schedule at its int32 batch counter under jit, where XLA may round the float32
        # schedule differently from eager mode (~1e-8); the reference reads it the same way.
        alphas = [float(jax.jit(schedule)(jnp.asarray(b, jnp.int32))) for b in range(num_batches)]
    np.testing.assert_allclose(alphas, [1.0, 0.75, 0.5, 0.25], rtol=1e-6)
    want = reference_trajectory(NP_INNER[inner_name](), theta0, data, num_fast_steps, alphas, num_minibatches)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_single_fast_call_stores_and_repositions_in_one_call():
    # K·M = 1: call 0 is also the last fast call; the first fast step is then scaled by alpha exactly.
    tx = optax.chain(optax.sgd(1.0), sfpo(1, 0.25, entropy_window=None))
    params = {"w": jnp.array([1.0, -2.0])}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.array([0.5, 1.0])}, state, params)
    np.testing.assert_allclose(updates["w"], [-0.125, -0.25], rtol=1e-6)
    assert calls_per_batch(state) == 1


# ---------------------------------------------------------------- ablation: no slow correction


@pytest.mark.parametrize("inner_name", ["sgd", "adamw", "clip_adamw"])
@pytest.mark.parametrize("num_fast_steps", [1, 3])
@pytest.mark.parametrize("num_minibatches", [1, 2, 4])
def test_without_slow_correction_matches_float64_reference(inner_name, num_fast_steps, num_minibatches):
    data = quadratic_data(NUM_BATCHES, num_minibatches, seed=5)
    theta0 = np.random.default_rng(6).normal(size=DIM)
    with jax.enable_x64(True):
        for alpha in (0.0, 0.5, 0.8, 1.0):
            got, state, calls = run_transform(
                inner_name, theta0, data, num_fast_steps, alpha, num_minibatches, slow_correction=False
            )
            assert calls == [num_fast_steps * num_minibatches] * NUM_BATCHES
            want = reference_trajectory(
                NP_INNER[inner_name](),
                theta0.copy(),
                data,
                num_fast_steps,
                [alpha] * NUM_BATCHES,
                num_minibatches,
                slow_correction=False,
            )
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=f"alpha={alpha}")
            sfpo_state = next(s for s in state if isinstance(s, SFPOState))
            assert int(sfpo_state.num_batches) == NUM_BATCHES and int(sfpo_state.count) == 0


def test_without_slow_correction_differs_from_the_full_method():
    # Guards against the flag being ignored: dropping stage III must change the trajectory.
    data = quadratic_data(NUM_BATCHES, 2, seed=5)
    theta0 = np.random.default_rng(6).normal(size=DIM)
    with jax.enable_x64(True):
        full, _, _ = run_transform("adamw", theta0, data, 2, 0.8, 2)
        ablated, _, _ = run_transform("adamw", theta0, data, 2, 0.8, 2, slow_correction=False)
    assert np.max(np.abs(full - ablated)) > 1e-3


def test_without_slow_correction_single_call_moves_by_alpha_times_the_update():
    # K·M = 1: every batch is one call that stores θ_s and lands on θ_s + α·u.
    tx = optax.chain(optax.sgd(1.0), sfpo(1, 0.25, entropy_window=None, slow_correction=False))
    params = {"w": jnp.array([1.0, -2.0])}
    state = tx.init(params)
    for b in range(3):
        assert calls_per_batch(state) == 1
        updates, state = tx.update({"w": jnp.array([0.5, 1.0])}, state, params)
        np.testing.assert_allclose(updates["w"], [-0.125, -0.25], rtol=1e-6)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(state[1].slow_params["w"], [1.0 - 0.125 * b, -2.0 - 0.25 * b], rtol=1e-6)
    assert int(state[1].num_batches) == 3


ENTROPIES = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98, 3.0, 1.0, 1.0]  # a spike at batch 8 (W = 5, τ = 1)


@pytest.mark.parametrize("slow_correction", [True, False])
def test_entropy_switch_trajectory_matches_reference(slow_correction):
    # The batch that records the spike runs its full cycle (its last call records it: the reposition call when
    # there is no slow correction); every later batch is one plain epoch of M calls.
    K, M, switch_at = 2, 2, 8
    data = quadratic_data(len(ENTROPIES), M, seed=7)
    theta0 = np.random.default_rng(8).normal(size=DIM)
    with jax.enable_x64(True):
        got, state, calls = run_transform(
            "adamw", theta0, data, K, 0.6, M, slow_correction=slow_correction, entropies=ENTROPIES, entropy_window=5
        )
    cycle = (K + 1 if slow_correction else K) * M
    assert calls == [cycle] * (switch_at + 1) + [M] * (len(ENTROPIES) - switch_at - 1)
    assert not sfpo_active(state) and calls_per_batch(state) == M
    want = reference_trajectory(
        NpAdamW(), theta0.copy(), data, K, [0.6] * len(ENTROPIES), M, slow_correction, plain_after=switch_at
    )
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_without_slow_correction_keeps_one_parameter_copy():
    params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros((32,))}
    full = tree_bytes(optax.chain(optax.adamw(1e-3), sfpo(3)).init(params))
    ablated = tree_bytes(optax.chain(optax.adamw(1e-3), sfpo(3, slow_correction=False)).init(params))
    assert full == ablated


# ---------------------------------------------------------------- K = 0 is the inner optimizer


def test_zero_fast_steps_is_the_inner_optimizer_bit_for_bit():
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3, weight_decay=0.1))
    tx = optax.chain(inner, sfpo(0, 0.3, num_minibatches=2))
    params = {"w": jax.random.normal(jax.random.key(0), (4, 5)), "b": jnp.linspace(-1, 1, 5)}

    def run(tx):
        def step(p, s, g):
            u, s = tx.update(g, s, p, entropy=jnp.float32(1.0))
            return optax.apply_updates(p, u), s

        step = jax.jit(step)
        p, s = params, tx.init(params)
        for i in range(7):
            g = jax.tree.map(functools.partial(lambda k, x: jnp.sin(x * k), i + 1), p)
            p, s = step(p, s, g)
        return p, s

    got, state = run(tx)
    want, _ = run(optax.with_extra_args_support(inner))
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert calls_per_batch(state) == 1  # 7 calls, batches of M = 2: one call left in the current batch
    assert not sfpo_active(state)


def test_zero_fast_steps_passes_the_updates_object_through():
    tx = sfpo(0)
    params = {"w": jnp.ones(3)}
    updates = {"w": jnp.arange(3.0)}
    out, _ = tx.update(updates, tx.init(params), params)
    assert out is updates


# ---------------------------------------------------------------- memory: one parameter-sized buffer


def tree_bytes(tree) -> int:
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def test_state_holds_exactly_one_parameter_copy_beyond_the_inner_state():
    params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros((32,)), "e": jnp.zeros((100, 8), jnp.bfloat16)}
    inner = optax.adamw(1e-3)
    base = tree_bytes(inner.init(params))
    with_sfpo = optax.chain(inner, sfpo(3, 0.8, entropy_window=30)).init(params)
    extra = tree_bytes(with_sfpo) - base
    # count, cycle_length, num_batches, entropy_count, entropy_sum, num_minibatches; active; the entropy window
    scalars = 6 * 4 + 1 + 30 * 4
    assert extra == tree_bytes(params) + scalars
    slow = with_sfpo[1].slow_params
    assert jax.tree.map(lambda x: (x.shape, x.dtype), slow) == jax.tree.map(lambda x: (x.shape, x.dtype), params)
    # K = 0 keeps nothing parameter-sized.
    assert tree_bytes(optax.chain(inner, sfpo(0)).init(params)) - base < 64


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_fast_steps": -1}, "num_fast_steps=-1"),
        ({"num_fast_steps": 1.5}, "num_fast_steps=1.5"),
        ({"alpha": 1.5}, "alpha=1.5"),
        ({"alpha": -0.1}, "alpha=-0.1"),
        ({"alpha": float("nan")}, "alpha=nan"),
        ({"alpha": "big"}, "alpha='big'"),
        ({"num_minibatches": 0}, "num_minibatches=0"),
        ({"entropy_window": 1}, "entropy_window=1"),
        ({"entropy_threshold": float("inf")}, "entropy_threshold=inf"),
        ({"entropy_threshold": float("nan")}, "entropy_threshold=nan"),
        ({"num_fast_steps": 0, "slow_correction": False}, "num_fast_steps=0"),
        ({"slow_correction": "no"}, "slow_correction='no'"),
    ],
)
def test_bad_arguments_raise_naming_argument_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(".", r"\.")):
        sfpo(**kwargs)


def test_missing_params_raises():
    tx = optax.chain(optax.sgd(0.1), sfpo(2, 0.5))
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))


def test_calls_per_batch_needs_exactly_one_sfpo_state():
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="found 0"):
        calls_per_batch(optax.adamw(1e-3).init(params))
    two = optax.chain(sfpo(1), sfpo(2)).init(params)
    with pytest.raises(ValueError, match="found 2"):
        sfpo_active(two)


@pytest.mark.parametrize("num_minibatches", [1, 2])
def test_alpha_one_is_k_plus_one_epochs_of_the_inner_optimizer_bit_for_bit(num_minibatches):
    """GRPO with K+1 epochs per batch (the compute-matched baseline) is SFPO with α = 1: θ_s is never stored and
    every call is the inner optimizer's, bit for bit."""
    K, inner = 3, optax.adamw(1e-2, weight_decay=0.1)
    tx = optax.chain(inner, sfpo(K, 1.0, num_minibatches, entropy_window=None))
    params = ref = {"w": jnp.linspace(-1.0, 1.0, 7)}
    state, ref_state = tx.init(params), inner.init(ref)
    initial = jax.tree.map(jnp.copy, state[1].slow_params)
    assert calls_per_batch(state) == (K + 1) * num_minibatches
    for batch in range(3):
        for call in range(calls_per_batch(state)):
            g = {"w": jnp.sin(params["w"] * (batch + 1) + call)}
            updates, state = tx.update(g, state, params)
            params = optax.apply_updates(params, updates)
            ref_updates, ref_state = inner.update({"w": jnp.sin(ref["w"] * (batch + 1) + call)}, ref_state, ref)
            ref = optax.apply_updates(ref, ref_updates)
        np.testing.assert_array_equal(params["w"], ref["w"])
    np.testing.assert_array_equal(state[1].slow_params["w"], initial["w"])  # never stored
