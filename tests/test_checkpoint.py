"""Checkpointer: round trips of optimizer states and keys, keep-last-N, sharded restore, killed saves, errors."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sfpo_jax.optim import sfpo
from sfpo_jax.train.checkpointer import Checkpointer

REPO = Path(__file__).resolve().parents[1]


class SlowState(NamedTuple):  # shaped like a custom optax state: an int32 counter, a param copy, a flag, a buffer
    count: jax.Array
    slow: dict
    active: jax.Array
    history: jax.Array  # zero-size here (orbax cannot write those; the Checkpointer rebuilds them)


def make_state(seed: int):
    key = jax.random.key(seed)
    params = {"w": jax.random.normal(key, (4, 3)), "b": jnp.arange(3, dtype=jnp.float32) + seed}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.01))
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    custom = SlowState(
        jnp.int32(7 + seed), jax.tree.map(lambda x: 2 * x, params), jnp.array(seed % 2 == 0), jnp.zeros((0,))
    )
    sfpo_tx = optax.chain(optax.adamw(1e-3), sfpo(0, 0.8), sfpo(3, 0.5, entropy_window=None))
    return {
        "params": params,
        "opt_state": (opt_state, custom, sfpo_tx.init(params)),
        "key_data": jax.random.key_data(jax.random.split(key, 2)),
        "typed_key": jax.random.fold_in(jax.random.key(seed, impl="rbg"), 3),
    }


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_optimizer_state_keys_and_meta(tmp_path):
    state = make_state(1)
    meta = {"step": 5, "data_position": 80, "history": [{"step": 5, "loss": 0.25}], "config": {"algo": "sfpo"}}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        ckpt.save(5, state, meta)
        assert ckpt.latest_step() == 5
    # A fresh checkpointer (a resumed process) restores onto a different live state and onto an abstract one.
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() == 5
        for target in (make_state(2), jax.eval_shape(lambda: make_state(2))):
            restored, restored_meta = ckpt.restore(target=target)
            assert_trees_equal(restored, state)
            assert restored_meta == meta
            assert isinstance(restored["opt_state"][1], SlowState)
            assert isinstance(restored["opt_state"][0][1][0], optax.ScaleByAdamState)


def test_keeps_last_n_and_refuses_old_steps(tmp_path):
    with Checkpointer(tmp_path, keep=2) as ckpt:
        for step in range(1, 5):
            ckpt.save(step, {"x": jnp.full((2,), float(step))}, {"step": step})
        assert ckpt.all_steps() == [3, 4]
        with pytest.raises(ValueError, match="step 4 is not after the latest checkpoint 4"):
            ckpt.save(4, {"x": jnp.zeros(2)}, {})
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["3", "4"]
    with Checkpointer(tmp_path, keep=2) as ckpt:
        state, meta = ckpt.restore(3, target={"x": jnp.zeros(2)})
        np.testing.assert_array_equal(state["x"], [3.0, 3.0])
        assert meta == {"step": 3}
        ckpt.save(5, {"x": jnp.zeros(2)}, {"step": 5})  # keep-last-N carries on across reopening
        assert ckpt.all_steps() == [4, 5]


def test_async_save(tmp_path):
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(1, {"x": jnp.arange(4.0)}, {"step": 1})
        ckpt.wait()
        assert ckpt.latest_step() == 1
        ckpt.save(2, {"x": jnp.arange(4.0) + 1}, {"step": 2})
    with Checkpointer(tmp_path) as ckpt:
        state, meta = ckpt.restore(target={"x": jnp.zeros(4)})
    np.testing.assert_array_equal(state["x"], [1.0, 2.0, 3.0, 4.0])
    assert meta == {"step": 2}


def test_restore_onto_named_sharding(tmp_path):
    assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
    mesh = jax.make_mesh((4, 2), ("data", "tensor"))
    state = {"w": jnp.arange(32.0).reshape(8, 4), "count": jnp.int32(3), "key": jax.random.split(jax.random.key(0), 8)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {})  # saved from one device...
        shardings = {
            "w": NamedSharding(mesh, P("data", "tensor")),
            "count": NamedSharding(mesh, P()),
            "key": NamedSharding(mesh, P("data")),
        }
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
        restored, _ = ckpt.restore(target=target)  # ...restored sharded over 8
    assert_trees_equal(restored, state)
    assert restored["w"].sharding == shardings["w"]
    assert restored["count"].sharding == shardings["count"]
    assert restored["key"].sharding.spec == P("data")
    assert len(restored["w"].addressable_shards) == 8


def test_leftover_tmp_dir_is_ignored_and_removed(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"x": jnp.ones(3)}, {"step": 1})
        ckpt.save(2, {"x": 2 * jnp.ones(3)}, {"step": 2})
    # What a save killed after writing some files leaves: orbax's temporary name for step 3.
    tmp = tmp_path / "3.orbax-checkpoint-tmp"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "_METADATA").write_text("{trunc")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 2
        state, meta = ckpt.restore(target={"x": jnp.zeros(3)})
        np.testing.assert_array_equal(state["x"], [2.0, 2.0, 2.0])
        assert meta == {"step": 2}
        assert not tmp.exists()
        ckpt.save(3, {"x": 3 * jnp.ones(3)}, {"step": 3})  # the killed step can be saved again
        assert ckpt.latest_step() == 3


_SAVER = textwrap.dedent(
    """
    import sys
    import time

    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity

    from sfpo_jax.train.checkpointer import Checkpointer

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def blocked_finalize(self):  # blocks the commit (the rename) of step 3 once its items are all written
        if self._final_path.name == "3":
            print("blocked", flush=True)
            time.sleep(600)
        await finalize(self)

    directory, mode = sys.argv[1], sys.argv[2]
    ckpt = Checkpointer(directory, keep=2)
    if mode == "block":
        atomicity.AtomicRenameTemporaryPath.finalize = blocked_finalize
    for step in range(1, 1000):
        ckpt.save(step, {"w": jnp.full((1 << 21,), float(step)), "n": jnp.int32(step)}, {"step": step})
        print("saved", step, flush=True)
    """
)


@pytest.mark.parametrize("mode", ["block", "timed"])
def test_save_killed_mid_way_leaves_last_checkpoint_restorable(tmp_path, mode):
    """A real process is SIGKILLed inside a save: either deterministically just before the commit ("block"), or
    at an arbitrary moment while it saves 8 MiB states in a loop ("timed")."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(tmp_path), mode],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    last_saved = 0
    try:
        for line in proc.stdout:
            if line.startswith("saved"):
                last_saved = int(line.split()[1])
            if mode == "block" and line.startswith("blocked"):
                assert {p.name for p in (tmp_path / "3.orbax-checkpoint-tmp").iterdir()} >= {"state", "meta"}
                break
            if mode == "timed" and last_saved == 2:
                time.sleep(0.15)  # somewhere inside the next save(s)
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert last_saved >= 2
    with Checkpointer(tmp_path, keep=2) as ckpt:
        latest = ckpt.latest_step()
        assert latest >= last_saved if mode == "timed" else latest == 2
        state, meta = ckpt.restore(target={"w": jnp.zeros(1 << 21), "n": jnp.int32(0)})
        assert meta == {"step": latest}
        assert int(state["n"]) == latest
        np.testing.assert_array_equal(np.asarray(state["w"]), np.full(1 << 21, float(latest), np.float32))
        assert not any(p.name.endswith(".orbax-checkpoint-tmp") for p in tmp_path.iterdir())


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="keep must be >= 1, got 0"):
        Checkpointer(tmp_path, keep=0)
    with Checkpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            ckpt.restore(target={"x": jnp.zeros(2)})
    with Checkpointer(tmp_path / "one") as ckpt:
        ckpt.save(1, {"x": jnp.zeros(2), "y": jnp.int32(0)}, {})
        with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7 .*available: \[1\]"):
            ckpt.restore(7, target={"x": jnp.zeros(2), "y": jnp.int32(0)})
        with pytest.raises(ValueError, match="does not match the target: not in target: y"):
            ckpt.restore(target={"x": jnp.zeros(2)})
        with pytest.raises(ValueError, match="does not match the target: missing in checkpoint: z"):
            ckpt.restore(target={"x": jnp.zeros(2), "y": jnp.int32(0), "z": jnp.zeros(1)})
        with pytest.raises(ValueError, match=r"x: saved shape \(2,\), target shape \(5,\)"):
            ckpt.restore(target={"x": jnp.zeros(5), "y": jnp.int32(0)})
        with pytest.raises(ValueError, match="y: saved dtype int32, target dtype float32"):
            ckpt.restore(target={"x": jnp.zeros(2), "y": jnp.float32(0)})
