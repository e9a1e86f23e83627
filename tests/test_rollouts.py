"""The rollout side on its own: the data cursor, DAPO's dynamic sampling (group filtering over generation rounds),
short batches, and the overlong handling; and that the learner's objective ignores the empty groups that pad a
short batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sfpo_jax.models import from_pretrained, load_tokenizer
from sfpo_jax.optim import sfpo
from sfpo_jax.sampling import FinishReason
from sfpo_jax.train import Position, TrainingPrompts, cli, learner, load_config, make_learner, make_rollouts
from sfpo_jax.train.rollouts import ShortBatchError, overlong_penalty

P, G = 4, 4


def reward_by_answer(completions, answers):
    """Prompts whose answer is ``const`` get 1.0 for every completion (no signal); the others the parity of the
    completion's length (a signal in almost every group of 4)."""
    return np.asarray([1.0 if a == "const" else float(len(c) % 2) for c, a in zip(completions, answers, strict=True)],
                      np.float32)


@pytest.fixture(scope="module")
def policy(policy_dir):
    return from_pretrained(policy_dir, dtype=jnp.float32), load_tokenizer(policy_dir)


def rollouts_for(policy, answers, *overrides):
    model, tok = policy
    cfg = load_config(None, [f"rollout.prompts_per_step={P}", f"rollout.group_size={G}", "rollout.max_new_tokens=6",
                             "rollout.num_minibatches=1", *overrides])
    ids = [tok.encode(f"{i}+{i}=", add_special_tokens=False) for i in range(len(answers))]
    data = TrainingPrompts(ids, answers, seed=0)
    return make_rollouts(model, tok, reward_by_answer, cfg.rollout, cfg.loss, data=data), cfg


def test_overlong_penalty_is_dapo_eq_13():
    """R = 0 for |y| <= L_max - L_cache, ((L_max - L_cache) - |y|) / L_cache up to L_max (times the factor)."""
    L_max, L_cache, factor = 16, 4, 0.5
    lengths = np.arange(1, L_max + 1)
    expected = [0.0 if y <= L_max - L_cache else ((L_max - L_cache) - y) / L_cache * factor for y in lengths]
    np.testing.assert_allclose(overlong_penalty(lengths, L_max, L_cache, factor), expected, rtol=1e-6)
    assert overlong_penalty(lengths, L_max, L_cache, factor)[-1] == -factor


def test_filtering_keeps_only_groups_with_a_signal_and_samples_more_rounds(policy):
    # Half the prompts carry no signal: a round of 4 prompts keeps about 2 groups, so a step needs 2+ rounds.
    answers = ["const", "x"] * 8
    rollouts, _ = rollouts_for(policy, answers, "rollout.filter_groups=true")
    params = nnx.state(policy[0])
    batch, m, position = rollouts.next(params, Position(), jax.random.key(0))
    rounds = m["rollout/generation_rounds"]
    assert rounds >= 2 and m["rollout/prompts_sampled"] == rounds * P and position == Position(1, rounds * P)
    assert m["rollout/kept_groups"] == P and batch.tokens.shape[0] == P * G
    adv = np.asarray(batch.advantages).reshape(P, G)
    assert np.all(np.abs(adv).max(1) > 0)  # every trained group carries a signal
    assert 0 < m["zero_variance_groups"] < 1  # the fraction among the sampled groups, not the kept ones
    # The next step continues at the cursor: a pure function of the position.
    _, m2, position2 = rollouts.next(params, position, jax.random.key(0))
    assert position2.cursor == position.cursor + m2["rollout/prompts_sampled"]
    again, _, _ = rollouts.next(params, Position(), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(batch.tokens))


def test_without_filtering_a_step_is_one_round(policy):
    rollouts, _ = rollouts_for(policy, ["const", "x"] * 8)
    batch, m, position = rollouts.next(nnx.state(policy[0]), Position(3, 5), jax.random.key(0))
    assert position == Position(4, 5 + P) and m["rollout/generation_rounds"] == 1 and m["rollout/kept_groups"] == P
    assert m["zero_variance_groups"] >= 0.5 and batch.tokens.shape[0] == P * G


def test_a_short_batch_is_padded_with_empty_groups_or_refused(policy):
    answers = ["const"] * 6 + ["x"] * 2  # at most 2 groups with a signal in 2 rounds of 4 prompts
    rollouts, _ = rollouts_for(policy, answers, "rollout.filter_groups=true", "rollout.max_generation_rounds=2")
    params = nnx.state(policy[0])
    batch, m, _ = rollouts.next(params, Position(), jax.random.key(0))
    kept = m["rollout/kept_groups"]
    assert m["rollout/generation_rounds"] == 2 and kept < P
    mask = np.asarray(batch.completion_mask).reshape(P, G, -1)
    assert mask[:kept].any(axis=(1, 2)).all() and not mask[kept:].any()
    assert not np.asarray(batch.attention_mask).reshape(P, G, -1)[kept:].any()
    error, _ = rollouts_for(policy, answers, "rollout.filter_groups=true", "rollout.max_generation_rounds=2",
                            "rollout.short_batch=error")
    with pytest.raises(RuntimeError, match=rf"only {kept} of rollout.prompts_per_step=4 groups had a signal after "
                                           r"rollout.max_generation_rounds=2 rounds"):
        error.next(params, Position(), jax.random.key(0))
    # The CLI turns it into one line and exit 2 (a setting the user can change), like every user error.
    assert issubclass(ShortBatchError, RuntimeError) and ShortBatchError in cli.USER_ERRORS


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_empty_groups_change_nothing_in_the_update(policy, agg):
    """The learner's update on a batch padded with empty groups equals its update on the rows alone: the padding
    has no token and no weight in any denominator (sequence counts included)."""
    model, _ = policy
    cfg = load_config(None, ["rollout.prompts_per_step=2", f"rollout.group_size={G}", "rollout.num_minibatches=1",
                             f"loss.agg={agg}", "optim.learning_rate=1e-2", "sfpo.num_fast_steps=0"])
    rng = np.random.default_rng(0)
    n, p, t = G, 3, 5
    real = learner.Batch(rng.integers(4, 20, (n, p + t)).astype(np.int32), np.ones((n, p + t), bool),
                         np.arange(t)[None, :] < rng.integers(1, t + 1, (n, 1)), np.full((n, t), -2.0, np.float32),
                         rng.normal(size=n).astype(np.float32), *[np.zeros((n, 0), np.float32)] * 2)
    padded = jax.tree.map(lambda x: np.concatenate([x, np.zeros_like(x)]), real)
    results = []
    for batch, prompts in ((real, 1), (padded, 2)):
        cfg_b = load_config(None, [f"rollout.prompts_per_step={prompts}", f"rollout.group_size={G}",
                                   "rollout.num_minibatches=1", f"loss.agg={agg}", "optim.learning_rate=1e-2"])
        # SGD, so that the params compare the gradients themselves (Adam's first step normalises them away).
        tx = optax.chain(optax.sgd(1.0), sfpo(num_fast_steps=0))
        learn, state = make_learner(model, tx, cfg_b.rollout, cfg.loss)
        state, m = learn(jax.tree.map(jnp.copy, state), batch)  # the update donates: keep the model's arrays
        results.append((state.params, m))
    (a, ma), (b, mb) = results
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
    for k in ("train/loss", "train/pg_loss", "entropy", "train/grad_norm"):
        np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5, err_msg=k)


def test_mask_truncated_drops_completions_that_hit_the_limit(policy):
    rollouts, _ = rollouts_for(policy, ["x"] * 8, "rollout.mask_truncated=true")
    plain, _ = rollouts_for(policy, ["x"] * 8)
    params = nnx.state(policy[0])
    masked, _, _ = rollouts.next(params, Position(), jax.random.key(1))
    batch, _, _ = plain.next(params, Position(), jax.random.key(1))
    full = np.asarray(batch.completion_mask)
    # All max_new_tokens = 6 tokens real and the last not EOS: nothing ended them.
    truncated = (full.sum(1) == full.shape[1]) & (np.asarray(batch.tokens)[:, -1] != policy[1].eos_token_id)
    assert truncated.any() and (~truncated).any()
    np.testing.assert_array_equal(np.asarray(masked.completion_mask), full & ~truncated[:, None])
    assert FinishReason.LENGTH == 1


def test_the_overlong_penalty_shapes_the_advantages_not_the_accuracy(policy):
    answers = ["const"] * 8  # reward 1 everywhere: only the penalty varies within a group
    shaped, _ = rollouts_for(policy, answers, "rollout.overlong_buffer=3")
    batch, m, _ = shaped.next(nnx.state(policy[0]), Position(), jax.random.key(1))
    lengths = np.asarray(batch.completion_mask).sum(1)
    penalty = overlong_penalty(lengths, 6, 3, 1.0)
    assert m["accuracy"] == 1.0 and m["reward/mean"] == 1.0
    np.testing.assert_allclose(m["reward/overlong_penalty"], penalty.mean(), rtol=1e-6)
    assert (np.asarray(batch.advantages) != 0).any() and m["zero_variance_groups"] < 1
