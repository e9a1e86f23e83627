"""Packed learner layouts (`sfpo_jax.train.packing`): the same log-probs, entropies, gradients and losses as the
padded layout, from fewer token cells and a bounded number of shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sfpo_jax.models import CausalLM, ModelConfig
from sfpo_jax.parallel import logical_sharding, make_mesh
from sfpo_jax.rl import grpo
from sfpo_jax.train import learner, packing

CONFIG = ModelConfig(architecture="qwen2", vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True, attention_bias=True)


def ragged_batch(seed: int, num_prompts: int = 3, group_size: int = 4, p: int = 7, t: int = 6):
    """A padded learner batch as the sampler lays it out: left-padded prompts of several lengths, each repeated
    for its group's rows, and right-padded completions of 1 to t tokens. Returns ``(tokens, attn, completion_mask)``
    as numpy arrays ``[N, p + t]``, ``[N, p + t]``, ``[N, t]``."""
    rng = np.random.default_rng(seed)
    n = num_prompts * group_size
    tokens = rng.integers(1, CONFIG.vocab_size, (n, p + t)).astype(np.int32)
    attn = np.zeros((n, p + t), bool)
    for g in range(num_prompts):
        rows = slice(g * group_size, (g + 1) * group_size)
        tokens[rows, :p] = tokens[g * group_size, :p]
        attn[rows, p - rng.integers(1, p + 1):p] = True
    lengths = rng.integers(1, t + 1, n)
    attn[:, p:] = np.arange(t)[None] < lengths[:, None]
    return tokens, attn, attn[:, p:].copy()


def packed_forward(model, packed: packing.Packed, completion_mask):
    """``(logp, entropy)`` ``[N, T]`` of a packed batch, its micro-batches put back into the batch's row order."""
    mask = jnp.asarray(completion_mask)
    out = [packing.completion_logprobs(model, jax.tree.map(lambda x, u=u: x[u], packed), mask[rows])
           for u, rows in enumerate(packed.rows)]
    order = np.argsort(packed.rows.reshape(-1))
    return tuple(jnp.concatenate(x)[order] for x in zip(*out, strict=True))


@pytest.fixture(scope="module")
def model():
    return CausalLM(CONFIG, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("mode", ["sequences", "groups"])
@pytest.mark.parametrize("num_micro,strided", [(1, False), (2, False), (2, True)])
def test_packed_logprobs_entropies_and_gradients_equal_the_padded_layouts(model, mode, num_micro, strided):
    tokens, attn, mask = ragged_batch(0)
    packed = packing.pack(tokens, attn, mask, mode, num_micro=num_micro, strided=strided)
    graphdef, params = nnx.split(model)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=mask.shape), jnp.float32)

    def objective(params, forward):  # a weighted sum of both outputs: every token's gradient path is exercised
        logp, entropy = forward(nnx.merge(graphdef, params))
        return jnp.sum(weights * (logp + 0.1 * entropy)), (logp, entropy)

    padded = lambda m: learner.completion_logprobs(m, jnp.asarray(tokens), jnp.asarray(attn), jnp.asarray(mask))
    (want, (logp, entropy)), want_grads = jax.value_and_grad(objective, has_aux=True)(params, padded)
    (got, (p_logp, p_entropy)), grads = jax.value_and_grad(objective, has_aux=True)(
        params, lambda m: packed_forward(m, packed, mask))
    np.testing.assert_allclose(p_logp, logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p_entropy, entropy, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(p_logp)[~mask] == 0) and np.all(np.asarray(p_entropy)[~mask] == 0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(jnp.abs(w).max()))


def test_sequences_hold_each_rollouts_real_tokens_once_and_groups_each_prompt_once_per_segment():
    tokens, attn, mask = ragged_batch(2, num_prompts=4, group_size=4)
    p = tokens.shape[1] - mask.shape[1]
    prompts = {tuple(tokens[i, :p][attn[i, :p]]) for i in range(0, len(tokens), 4)}
    seq = packing.pack(tokens, attn, mask, "sequences")
    assert int((seq.segments > 0).sum()) == int(attn.sum())
    for num_micro, strided in ((1, False), (2, False), (2, True)):
        groups = packing.pack(tokens, attn, mask, "groups", num_micro=num_micro, strided=strided)
        assert int((groups.branches > 0).sum()) == int(mask.sum())  # each completion once
        segments = [(u, r, s) for u in range(num_micro) for r in range(groups.tokens.shape[1])
                    for s in set(groups.segments[u, r]) - {0}]
        for u, r, s in segments:  # a segment is one prompt, once, then its completions
            cells = groups.segments[u, r] == s
            assert tuple(groups.tokens[u, r][cells & (groups.branches[u, r] == 0)]) in prompts
        assert int((groups.segments > 0).sum()) < int(attn.sum())
        assert int(groups.target_mask.sum()) == int(mask.sum())
    # One group that fits a row: its prompt's cells appear once.
    one = packing.pack(tokens[:4], attn[:4], mask[:4], "groups")
    assert int((one.segments > 0).sum()) == int(attn[0, :p].sum()) + int(mask[:4].sum())
    # Balanced micro-batches keep the groups whole (2 of the 4 in each); strided ones split every group in two, so
    # more prompt copies.
    rows = packing.pack(tokens, attn, mask, "groups", num_micro=2).rows
    np.testing.assert_array_equal(np.sort(rows.reshape(-1)), np.arange(16))
    for micro in rows:  # two whole groups of 4 rows each
        groups = sorted({int(r) // 4 for r in micro})
        assert len(groups) == 2 and sorted(micro) == [r for g in groups for r in range(4 * g, 4 * g + 4)]
    strided = packing.pack(tokens, attn, mask, "groups", num_micro=2, strided=True)
    np.testing.assert_array_equal(strided.rows, np.arange(16).reshape(8, 2).T)
    prompt_cells = lambda packed: int((packed.branches == 0).sum() - (packed.segments == 0).sum())
    assert prompt_cells(strided) > prompt_cells(packing.pack(tokens, attn, mask, "groups", num_micro=2))


def test_a_completion_sees_its_prompt_and_itself_only():
    """Rows of `attention_mask` for one segment: a prompt of 2 cells (branch 0), then completions 1 and 2 of 2 and 1
    cells, then a second segment of 1 cell and a padding cell."""
    segments = jnp.asarray([1, 1, 1, 1, 1, 2, 0])
    branches = jnp.asarray([0, 0, 1, 1, 2, 0, 0])
    got = np.asarray(packing.attention_mask(segments, branches)).astype(int)
    want = np.asarray([[1, 0, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0, 0],
                       [1, 1, 0, 0, 1, 0, 0],
                       [0, 0, 0, 0, 0, 1, 0],
                       [0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(got, want)


def test_positions_restart_per_sequence_and_continue_from_the_prompt_in_a_group():
    tokens, attn, mask = ragged_batch(3, num_prompts=1, group_size=3)
    p = tokens.shape[1] - mask.shape[1]
    prompt_len, lengths = int(attn[0, :p].sum()), mask.sum(1)
    groups = packing.pack(tokens, attn, mask, "groups")
    row = groups.positions[0, 0]
    want = np.concatenate([np.arange(prompt_len), *(prompt_len + np.arange(c) for c in lengths)])
    np.testing.assert_array_equal(row[: len(want)], want)
    seq = packing.pack(tokens, attn, mask, "sequences")
    for r in range(seq.tokens.shape[1]):
        for s in set(seq.segments[0, r]) - {0}:
            cells = seq.segments[0, r] == s
            np.testing.assert_array_equal(seq.positions[0, r][cells], np.arange(cells.sum()))


def test_buckets_are_few_per_octave_and_close_above():
    sizes = [packing.bucket(n) for n in range(1, 4097)]
    assert all(n <= b <= max(n * 1.125, n) for n, b in zip(range(1, 4097), sizes, strict=True))
    assert len({b for b in sizes if 1024 < b <= 2048}) == 8
    assert packing.bucket(1000) == 1024 and packing.bucket(1025) == 1152


def test_packed_shapes_come_from_a_few_buckets():
    """60 batches of random prompt and completion lengths (a run's steps) give a bounded set of `(R, L, K)` shapes
    (the programs the learner compiles), not one per batch; R is a multiple of `row_multiple`, L within the row
    budget, and every cell is a real token or padding accounted for."""
    for mode in ("sequences", "groups"):
        shapes = set()
        for seed in range(60):
            tokens, attn, mask = ragged_batch(seed, num_prompts=8, group_size=4, p=24, t=40)
            packed = packing.pack(tokens, attn, mask, mode, num_micro=2, row_multiple=2)
            assert packed.tokens.shape[1] % 2 == 0 and packed.tokens.shape[2] <= 4 * 64
            assert packed.targets.shape[2] <= packed.tokens.shape[2]
            shapes.add((packed.tokens.shape, packed.targets.shape))
        for (_, rows, length), (_, _, logits) in shapes:  # sizes of the bucket grid, 4 per octave
            assert all(packing.bucket(x, 2) == x for x in (rows // 2, length, logits))
        assert len(shapes) <= 24, (mode, sorted(shapes))


def test_a_long_group_is_split_into_sub_groups_within_the_row_budget(model):
    tokens, attn, mask = ragged_batch(4, num_prompts=1, group_size=8, p=8, t=8)
    packed = packing.pack(tokens, attn, mask, "groups", max_row_tokens=24)
    assert packed.tokens.shape[2] <= 24
    prompt_len = int(attn[0, :8].sum())
    copies = int((packed.segments > 0).sum() - mask.sum()) // prompt_len
    assert copies > 1 and int((packed.segments > 0).sum() - mask.sum()) == copies * prompt_len
    logp, _ = packed_forward(model, packed, mask)
    want, _ = learner.completion_logprobs(model, jnp.asarray(tokens), jnp.asarray(attn), jnp.asarray(mask))
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-5)


def test_packing_refuses_what_it_cannot_lay_out():
    tokens, attn, mask = ragged_batch(5)
    with pytest.raises(ValueError, match="must be one of"):
        packing.pack(tokens, attn, mask, "none")
    with pytest.raises(ValueError, match="12 rows do not split into 5"):
        packing.pack(tokens, attn, mask, "sequences", num_micro=5)
    hole = attn.copy()
    hole[0, -mask.shape[1]] = False  # the completion's first token is padding, its second a loss token
    hole_mask = mask.copy()
    hole_mask[0, :2] = [False, True]
    with pytest.raises(ValueError, match="row 0: a loss token's predicting slot is padding"):
        packing.pack(tokens, hole, hole_mask, "sequences")


def learner_batch(seed: int, **kw) -> learner.Batch:
    """`ragged_batch` with old / reference log-probs and advantages, a zero-advantage group among them."""
    tokens, attn, mask = ragged_batch(seed, **kw)
    rng = np.random.default_rng(seed + 100)
    logp = lambda: np.where(mask, -rng.uniform(0.5, 4.0, mask.shape), 0).astype(np.float32)
    advantages = rng.normal(size=len(tokens)).astype(np.float32)
    advantages[:4] = 0  # the first group: every reward alike
    return learner.Batch(tokens, attn, mask, logp(), advantages, logp(), np.zeros((len(tokens), 0), np.float32))


def gradient_capture() -> optax.GradientTransformationExtraArgs:
    """An "optimizer" that moves nothing and keeps the latest gradient as its state (a params difference would
    round the gradient to the params' float32 spacing)."""
    return optax.GradientTransformationExtraArgs(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None, **extra: (jax.tree.map(jnp.zeros_like, grads), grads))


def run_update(graphdef, params, batch, loss, num_micro, layout, sharding=None):
    """One update: ``(grads, metrics)``."""
    tx = gradient_capture()
    if sharding is not None:
        batch, layout = jax.device_put((batch, layout), sharding)
    _, grads, metrics = learner.make_update_fn(graphdef, tx, loss, num_micro)(
        jax.tree.map(jnp.copy, params), tx.init(params), batch, layout)
    return jax.device_get((grads, metrics))


def assert_same_update(got, want):
    """Every metric to 1e-5 relative; the gradient to 1e-5 relative, leaf by leaf in norm and per entry against
    its leaf's scale."""
    (grads, metrics), (want_grads, want_metrics) = got, want
    assert metrics.keys() == want_metrics.keys()
    for name in want_metrics:
        np.testing.assert_allclose(metrics[name], want_metrics[name], rtol=1e-5, atol=1e-7, err_msg=name)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert np.linalg.norm(g - w) <= 1e-5 * np.linalg.norm(w) + 1e-12
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))


LOSSES = [grpo.LossConfig(agg=agg, kl_coef=0.1, entropy_coef=0.01) for agg in
          (*grpo.AGGREGATIONS, grpo.MICRO_BATCH_TOKEN_MEAN)] + [grpo.LossConfig(entropy_coef=0.0)]


@pytest.mark.parametrize("loss", LOSSES, ids=lambda c: f"{c.agg}-kl{c.kl_coef}-ent{c.entropy_coef}")
@pytest.mark.parametrize("num_micro", [1, 2])
def test_a_packed_update_is_the_padded_update(model, loss, num_micro):
    """Metrics (loss, KL, entropy, clip fractions, grad norm, ...) and the gradient equal the padded layout's, in
    each mode, for every aggregation, with and without micro-batches, KL and the entropy bonus on (and both off)."""
    batch = learner_batch(6)
    graphdef, params = nnx.split(model)
    want = run_update(graphdef, params, batch, loss, num_micro, None)
    for mode in ("sequences", "groups"):
        strided = loss.agg == grpo.MICRO_BATCH_TOKEN_MEAN  # the one objective that reads the split
        layout = packing.pack(batch.tokens, batch.attention_mask, batch.completion_mask, mode,
                              num_micro=num_micro, strided=strided)
        assert_same_update(run_update(graphdef, params, batch, loss, num_micro, layout), want)


@pytest.mark.parametrize("loss", [LOSSES[0], LOSSES[4]], ids=lambda c: c.agg)
def test_a_packed_update_on_an_8_device_mesh_is_the_one_device_padded_update(model, loss):
    mesh = make_mesh(data=8)
    batch = learner_batch(7, num_prompts=4)
    graphdef, params = nnx.split(model)
    want = run_update(graphdef, params, batch, loss, 2, None)
    sharding = jax.tree.map(lambda _: logical_sharding(mesh, ("batch",)), batch)
    for mode in ("sequences", "groups"):
        layout = packing.pack(batch.tokens, batch.attention_mask, batch.completion_mask, mode, num_micro=2,
                              strided=loss.agg == grpo.MICRO_BATCH_TOKEN_MEAN, row_multiple=8)
        layout_sharding = jax.tree.map(lambda _: logical_sharding(mesh, (None, "batch")), layout)
        assert_same_update(run_update(graphdef, params, batch, loss, 2, layout, (sharding, layout_sharding)), want)


@pytest.mark.parametrize("sharded", [False, True], ids=["one-device", "data-parallel"])
def test_the_old_and_reference_logprob_pass_reads_the_same_layout(model, sharded):
    mesh = make_mesh(data=8) if sharded else None
    batch = learner_batch(8, num_prompts=4)
    graphdef, params = nnx.split(model)
    logprob_fn = learner.make_logprob_fn(graphdef, micro_batch_size=8)  # 2 micro-batches
    inputs = (batch.tokens, batch.attention_mask, batch.completion_mask)
    want = logprob_fn(params, *inputs)
    for mode in ("sequences", "groups"):
        layout = packing.pack(*inputs, mode, num_micro=2, row_multiple=8 if sharded else 1)
        again = packing.pack(*inputs, mode, num_micro=2, row_multiple=8 if sharded else 1)
        for a, b in zip(layout, again, strict=True):  # a pure function of the batch: resume replays it
            np.testing.assert_array_equal(a, b)
        args = (*inputs, layout)
        if sharded:
            args = (*jax.device_put(inputs, logical_sharding(mesh, ("batch",))),
                    jax.device_put(layout, logical_sharding(mesh, (None, "batch"))))
        got = logprob_fn(params, *args)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(got)[~batch.completion_mask] == 0)


@pytest.fixture(scope="module")
def padded_run(policy_dir, tmp_path_factory):
    return train_with(policy_dir, tmp_path_factory.mktemp("none"), "rollout.packing=none")


def train_with(policy_dir, out, *extra):
    """Two SFPO steps of the trainer on the tiny policy: 2 mini-batches of 2 micro-batches, the old log-probs
    recomputed and a KL term, so that the update and both log-prob passes run in the configured layout. A small
    learning rate: Adam's first steps are ~lr · sign(g), so a gradient entry near 0, where float rounding decides
    the sign, moves by up to 2 lr between two layouts (the update tests check the gradients themselves)."""
    from sfpo_jax.train import load_config, train
    from tests.test_train import overrides

    cfg = load_config(None, [*overrides(policy_dir, out), "run.steps=2", "eval.every=0", "run.checkpoint_every=0",
                             "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.micro_batch_size=4",
                             "rollout.recompute_old_logprobs=true", "loss.kl_coef=0.05", "optim.learning_rate=1e-4",
                             *extra])
    return train(cfg)


@pytest.mark.parametrize("extra", [["rollout.packing=sequences"], ["rollout.packing=groups"],
                                   ["rollout.packing=groups", "mesh.data=8"]], ids=["sequences", "groups", "mesh"])
def test_the_trainer_learns_the_same_in_every_layout(policy_dir, tmp_path, padded_run, extra):
    from sfpo_jax.train import deterministic

    packed = train_with(policy_dir, tmp_path, *extra)
    for got, want in zip(packed.history, padded_run.history, strict=True):
        got, want = deterministic(got), deterministic(want)
        assert got.keys() == want.keys()
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    a, b = nnx.state(packed.model, nnx.Param), nnx.state(padded_run.model, nnx.Param)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)


def test_the_fused_attention_path_takes_the_packed_mask(model, monkeypatch):
    """`model.attention: cudnn` hands the packed `[R, L, L]` mask to `attend_fused` as it hands the padded one (cuDNN
    reads it as a bias: `jax.nn.dot_product_attention` has no segment ids): with JAX's reference in place of the
    kernel (no GPU here) and float32 operands, the packed log-probs are the padded einsum path's."""
    from sfpo_jax.models import transformer

    fused, calls = transformer.attend_fused, []

    def reference(q, k, v, mask, dtype):
        calls.append(mask.shape)
        return fused(q, k, v, mask, dtype, implementation="xla")

    monkeypatch.setattr(transformer, "attend_fused", reference)
    tokens, attn, mask = ragged_batch(9)
    want, _ = learner.completion_logprobs(model, jnp.asarray(tokens), jnp.asarray(attn), jnp.asarray(mask))
    graphdef, state = nnx.split(model)
    cudnn = nnx.merge(graphdef, state)
    cudnn.attention = "cudnn"
    packed = packing.pack(tokens, attn, mask, "groups")
    got, _ = packed_forward(cudnn, packed, mask)
    assert calls and all(shape == (*packed.tokens.shape[1:], packed.tokens.shape[2]) for shape in calls)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_micro_batches_balance_the_real_tokens():
    """Micro-batches are packed to one shape, so the fullest sets it: whole groups are spread so that the micro-
    batches' real tokens are close. Two long groups and two short ones over two micro-batches of two groups: one
    long group in each (contiguous blocks would put both long ones in the first)."""
    tokens, attn, _ = ragged_batch(10, num_prompts=4, group_size=2, p=4, t=16)
    attn[:, 4:] = False
    attn[:4, 4:] = True  # groups 0 and 1: 16-token completions; groups 2 and 3: 1 token
    attn[4:, 4] = True
    rows = packing.pack(tokens, attn, attn[:, 4:].copy(), "groups", num_micro=2).rows
    assert [len({0, 1} & {int(r) // 2 for r in micro}) for micro in rows] == [1, 1]
