"""Continuous batching (`Sampler.generate(..., slots=S)`, `sfpo_jax.sampling.slots`): the rollout is the same
token for token whatever S (and as the static path), on one device and on a mesh, with ragged lengths; a refill
frees no row-step it should not; the programs are few and the whole rollout is one device call."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from sfpo_jax.parallel import make_mesh
from sfpo_jax.sampling import FinishReason, Sampler, SamplingConfig
from tests.test_sampling import PAD, PROMPTS, VOCAB, make_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import bench_rollout

# Many EOS ids: the tiny random model stops after a few tokens on some rows, runs to max_new_tokens on others.
EOS = (3, 7, 11, 20, 30, 40, 50, 60, 70, 80)
RAGGED = SamplingConfig(max_new_tokens=12, num_samples=4, eos_token_ids=EOS)  # 6 prompts below: N = 24
MORE_PROMPTS = [*PROMPTS, [9, 9, 4], [i % VOCAB + 2 for i in range(20)]]


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def static(model):
    return Sampler(model, pad_token_id=PAD).generate(MORE_PROMPTS, RAGGED, jax.random.key(11))


def assert_same_rollout(a, b, what):
    np.testing.assert_array_equal(a.tokens, b.tokens, err_msg=f"tokens, {what}")
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, err_msg=f"logprobs, {what}")
    for name in ("prompt_tokens", "prompt_mask", "mask", "lengths", "finish_reason"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=f"{name}, {what}")


def test_the_workload_is_ragged(static):
    lengths = static.lengths
    assert lengths.min() < 4 and lengths.max() == RAGGED.max_new_tokens and len(set(lengths.tolist())) > 4
    assert {FinishReason.EOS, FinishReason.LENGTH} <= set(static.finish_reason.tolist())


@pytest.mark.parametrize("slots", [1, 4, 8, 16, 24, 64])  # 24 and 64: at least N, the static path
def test_slots_give_the_static_rollout(model, static, slots):
    sampler = Sampler(model, pad_token_id=PAD)
    r = sampler.generate(MORE_PROMPTS, RAGGED, jax.random.key(11), slots=slots)
    assert_same_rollout(r, static, f"slots={slots}")
    real = int(static.lengths.sum())
    if slots < 24:  # refilled: every real token took one row-step, a slot idles only once nothing is pending
        steps = sampler.row_steps // slots
        assert sampler.row_steps == slots * steps and real <= sampler.row_steps
        assert steps < 24 * RAGGED.max_new_tokens // slots + RAGGED.max_new_tokens
        assert sampler.row_steps - real < slots * RAGGED.max_new_tokens  # the drain, at most one row's length each
        # The schedule is the documented one: bench_rollout's host replay of it gives the engine's row-steps.
        assert sampler.row_steps == bench_rollout.slots_row_steps(static.lengths.tolist(), slots)


def test_refill_beats_the_static_path_at_the_same_rows_in_flight(model):
    """4 prompts of 4 samples through 4 slots: the static path with 4 rows in flight is 4 calls of one prompt, each
    until its longest row ends; refilled slots waste only the final drain."""
    sampler = Sampler(model, pad_token_id=PAD, batch_multiple=4)
    config = RAGGED
    key = jax.random.key(11)
    r = sampler.generate(MORE_PROMPTS[:4], config, key, slots=4)
    refilled = sampler.row_steps
    chunked = sampler.generate(MORE_PROMPTS[:4], config, key, chunk_size=1)
    assert_same_rollout(r, chunked, "slots=4 vs chunk_size=1")
    assert refilled < sampler.row_steps, (refilled, sampler.row_steps)


@pytest.mark.parametrize("config", [
    SamplingConfig(max_new_tokens=10, temperature=0.0, num_samples=2, eos_token_ids=EOS),
    SamplingConfig(max_new_tokens=10, temperature=0.7, top_k=8, top_p=0.9, num_samples=3, eos_token_ids=EOS),
    SamplingConfig(max_new_tokens=10, num_samples=1, eos_token_ids=EOS),
])
def test_slots_with_other_controls(model, config):
    sampler = Sampler(model, pad_token_id=PAD)
    key = jax.random.key(2)
    static = sampler.generate(MORE_PROMPTS, config, key)
    assert_same_rollout(sampler.generate(MORE_PROMPTS, config, key, slots=4), static, f"{config}")


def test_a_cache_longer_than_needed(model, static):
    """`max_cache_length` beyond P + max_new_tokens: the staging slot is the cache's last, the rest unused."""
    sampler = Sampler(model, pad_token_id=PAD, max_cache_length=80)
    r = sampler.generate(MORE_PROMPTS, RAGGED, jax.random.key(11), slots=8)
    np.testing.assert_array_equal(r.tokens, static.tokens)
    np.testing.assert_allclose(r.logprobs, static.logprobs, atol=1e-5)


def test_programs_are_few_and_the_rollout_is_one_device_call(model):
    sampler = Sampler(model, pad_token_id=PAD, prompt_buckets=(32,))
    rng = np.random.default_rng(0)
    calls = []
    for i, n in enumerate([6, 5, 7, 6]):  # 20-28 sequences: one padded sequence count (32), one bank (8 rows)
        prompts = [rng.integers(1, VOCAB, rng.integers(1, 20)).tolist() for _ in range(n)]
        sampler.generate(prompts, RAGGED, jax.random.key(i), slots=8)
        if i == 0:
            assert sampler.num_traces == 2  # one prefill, one decode
            ((shape, prog),) = sampler._programs.items()
            assert prog.decode._cache_size() == 1 and prog.prefill._cache_size() == 1
            counted = lambda f: lambda *a: calls.append(1) or f(*a)
            sampler._programs[shape] = prog._replace(prefill=counted(prog.prefill), decode=counted(prog.decode))
    assert sampler.num_traces == 2 and len(sampler._programs) == 1
    assert len(calls) == 6  # prefill + decode per rollout: every refill and decode step on device


@pytest.mark.parametrize("kwargs, match", [
    (dict(slots=0), "slots=0"), (dict(slots=2.0), "slots=2.0"), (dict(slots=True), "slots=True")])
def test_bad_slots(model, kwargs, match):
    sampler = Sampler(model)
    with pytest.raises(ValueError, match=match):
        sampler.generate(PROMPTS, RAGGED, jax.random.key(0), **kwargs)
    assert sampler.num_traces == 0


@pytest.mark.parametrize("axes", [dict(data=8), dict(data=4, tensor=2), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_slots_give_the_one_device_rollout(model, static, axes):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (forced CPU) devices")
    mesh = make_mesh(**axes)
    sampler = Sampler(model, mesh=mesh, pad_token_id=PAD)
    shards = 8 // axes.get("tensor", 1)
    with pytest.raises(ValueError, match=f"multiple of the mesh's {shards} batch shards"):
        sampler.generate(MORE_PROMPTS, RAGGED, jax.random.key(11), slots=shards + 2)
    for slots in (shards, 16, None):
        r = sampler.generate(MORE_PROMPTS, RAGGED, jax.random.key(11), slots=slots)
        assert_same_rollout(r, static, f"{axes}, slots={slots}")


def test_the_trainer_decodes_through_rollout_decode_slots(policy_dir, tmp_path, monkeypatch):
    """`rollout.decode_slots`: the sampler gets `slots=` (rows over all processes) and the run is the same step for
    step as the static one (rollouts token for token, so the same rewards and, up to float rounding, losses)."""
    from sfpo_jax.train import load_config, rollouts, train
    from sfpo_jax.train.config import ConfigError
    from tests.test_train import overrides

    calls = []

    class Recording(Sampler):
        def generate(self, prompts, *args, **kwargs):
            calls.append(kwargs.get("slots"))
            return super().generate(prompts, *args, **kwargs)

    monkeypatch.setattr(rollouts, "Sampler", Recording)
    runs = {}
    for slots in (None, 4):
        extra = ["run.steps=2", "eval.every=0", "run.checkpoint_every=0", "rollout.max_new_tokens=12"]
        cfg = load_config(None, [*overrides(policy_dir, tmp_path / str(slots), *extra),
                                 *([f"rollout.decode_slots={slots}"] if slots else [])])
        runs[slots] = train(cfg).history
    assert calls == [None, None, 4, 4]
    for a, b in zip(runs[None], runs[4], strict=True):
        for name in ("reward/mean", "accuracy", "response_length/mean", "response_length/max", "finished"):
            assert a[name] == b[name], name
        np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match=r"rollout\.decode_slots=0 must be >= 1"):
        load_config(None, ["rollout.decode_slots=0"])
