"""Sampler against the full (uncached) forward: greedy argmax, log-probs, EOS, top-k/top-p sets (exactly against
transformers' warpers, and their sampled frequencies), sample layout, determinism, compile counts, the params
override, prompt lengths and chunking, sharded meshes and input errors. Precisions other than float32:
test_precision.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfpo_jax.models import CausalLM, ModelConfig
from sfpo_jax.parallel import make_mesh
from sfpo_jax.sampling import (
    FinishReason,
    Rollout,
    Sampler,
    SamplingConfig,
    concat_rollouts,
    prompt_bucket,
    sample_logits,
    sample_with_logprobs,
    token_logprobs,
)
from sfpo_jax.sampling.ops import argmax, filter_logits

VOCAB = 96
CONFIG = ModelConfig("qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, attention_bias=True, max_position_embeddings=256)
PROMPTS = [[5, 17, 3, 9, 41, 2, 77], [11, 12, 13], [60], [i % VOCAB + 1 for i in range(12)]]
PAD = 0


def make_model(seed=0, scale=12.0):
    """A tiny random model whose weights are scaled up so that its next-token distributions are peaked (greedy
    paths are not decided by float noise) yet not one-hot (sampling has choices)."""
    model = CausalLM(CONFIG, rngs=nnx.Rngs(seed))
    nnx.update(model, jax.tree.map(lambda x: x * scale if x.ndim > 1 else x, nnx.state(model)))
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def sampler(model):
    return Sampler(model, pad_token_id=PAD)


@nnx.jit
def _forward(model, ids):
    return model(ids)


def row_logits(model, rollout: Rollout, row: int) -> np.ndarray:
    """`[max_new_tokens, V]` logits of the full forward on one unpadded row, at the positions that predict each
    generated token (teacher forcing on the rollout's own tokens)."""
    prompt = rollout.prompt_tokens[row][rollout.prompt_mask[row]]
    seq = np.concatenate([prompt, rollout.tokens[row]])[None]
    logits = np.asarray(_forward(model, jnp.asarray(seq)))[0]
    return logits[len(prompt) - 1: len(prompt) - 1 + rollout.tokens.shape[1]]


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_greedy_equals_full_forward_argmax_on_ragged_batch(model, sampler):
    config = SamplingConfig(max_new_tokens=8, temperature=0.0)
    r = sampler.generate(PROMPTS, config, jax.random.key(0))
    n, p = len(PROMPTS), 16
    assert r.tokens.shape == r.logprobs.shape == r.mask.shape == (n, 8)
    assert r.prompt_tokens.shape == r.prompt_mask.shape == (n, p)
    assert r.tokens.dtype == np.int32 and r.logprobs.dtype == np.float32 and r.mask.dtype == bool
    for i, prompt in enumerate(PROMPTS):  # left-padded to the bucket
        np.testing.assert_array_equal(r.prompt_tokens[i, p - len(prompt):], prompt)
        assert r.prompt_mask[i].sum() == len(prompt) and r.prompt_mask[i, p - len(prompt):].all()
        assert (r.prompt_tokens[i, : p - len(prompt)] == PAD).all()
    assert r.mask.all() and (r.lengths == 8).all() and (r.finish_reason == FinishReason.LENGTH).all()
    for i in range(n):
        logits = row_logits(model, r, i)
        np.testing.assert_array_equal(r.tokens[i], logits.argmax(-1))
        expected = np.take_along_axis(log_softmax(logits), r.tokens[i][:, None], -1)[:, 0]
        np.testing.assert_allclose(r.logprobs[i], expected, atol=1e-4)


@pytest.mark.parametrize("controls", [dict(temperature=1.0), dict(temperature=0.7, top_k=8, top_p=0.9)])
def test_logprobs_equal_teacher_forced_full_forward(model, sampler, controls):
    """Log-probs are the temperature-1 policy's, whatever the sampling controls; checked on the padded
    `[prompt_tokens | tokens]` batch exactly as the trainer recomputes them."""
    r = sampler.generate(PROMPTS, SamplingConfig(max_new_tokens=10, num_samples=2, **controls), jax.random.key(1))
    ids = np.concatenate([r.prompt_tokens, r.tokens], axis=1)
    mask = np.concatenate([r.prompt_mask, r.mask], axis=1)
    logits = np.asarray(nnx.jit(lambda m, x, a: m(x, attention_mask=a))(model, jnp.asarray(ids), jnp.asarray(mask)))
    p = r.prompt_tokens.shape[1]
    lp = np.take_along_axis(log_softmax(logits[:, p - 1:-1]), r.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(r.logprobs, np.where(r.mask, lp, 0.0), atol=1e-4)
    assert np.all(r.logprobs <= 0) and np.any(r.logprobs < -1e-3)


def test_eos_masks_pads_and_finish_reasons(sampler):
    """EOS is taken from the greedy output itself (row 0's third token), so it surely occurs."""
    config = SamplingConfig(max_new_tokens=8, temperature=0.0)
    free = sampler.generate(PROMPTS, config, jax.random.key(0))
    eos = int(free.tokens[0, 2])
    r = sampler.generate(PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0.0, eos_token_ids=(eos, VOCAB - 1)),
                         jax.random.key(0))
    stopped = 0
    for i in range(len(PROMPTS)):
        hits = np.flatnonzero(np.isin(free.tokens[i], [eos, VOCAB - 1]))
        length = hits[0] + 1 if hits.size else 8
        stopped += bool(hits.size)
        assert r.lengths[i] == length
        assert r.finish_reason[i] == (FinishReason.EOS if hits.size else FinishReason.LENGTH)
        np.testing.assert_array_equal(r.mask[i], np.arange(8) < length)
        np.testing.assert_array_equal(r.tokens[i, :length], free.tokens[i, :length])
        np.testing.assert_allclose(r.logprobs[i, :length], free.logprobs[i, :length], atol=1e-6)
        assert (r.tokens[i, length:] == PAD).all() and (r.logprobs[i, length:] == 0).all()
    assert stopped >= 1 and r.lengths[0] <= 3


class FakeTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(t) for t in ids if not (skip_special_tokens and t == 7))


def test_texts_stop_at_eos():
    r = Rollout(prompt_tokens=np.zeros((2, 1), np.int32), prompt_mask=np.ones((2, 1), bool),
                tokens=np.array([[3, 7, 0], [4, 5, 6]], np.int32), logprobs=np.zeros((2, 3), np.float32),
                mask=np.array([[1, 1, 0], [1, 1, 1]], bool), lengths=np.array([2, 3], np.int32),
                finish_reason=np.array([0, 1], np.int32))
    assert r.texts(FakeTokenizer()) == ["3", "4 5 6"]
    assert r.texts(FakeTokenizer(), skip_special_tokens=False) == ["3 7", "4 5 6"]


def allowed_sets(logits, temperature, top_k, top_p, slack=1e-4):
    """Boolean `[..., V]` of tokens the controls may pick, from full-forward logits (slack for float ties)."""
    scaled = logits / temperature
    allowed = np.ones_like(scaled, bool)
    if top_k:
        kth = np.sort(scaled, -1)[..., -top_k][..., None]
        allowed &= scaled >= kth - slack
    if top_p < 1:
        masked = np.where(allowed, scaled, -np.inf)
        probs = np.exp(masked - masked.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        order = np.argsort(-probs, -1)
        sorted_p = np.take_along_axis(probs, order, -1)
        before = np.cumsum(sorted_p, -1) - sorted_p
        keep_sorted = before < top_p + slack
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        allowed &= keep
    return allowed


@pytest.mark.parametrize("controls", [dict(top_k=3), dict(top_p=0.6), dict(top_k=6, top_p=0.5)])
def test_top_k_top_p_tokens_lie_in_allowed_set(model, sampler, controls):
    config = SamplingConfig(max_new_tokens=6, temperature=1.5, num_samples=4, **controls)
    r = sampler.generate(PROMPTS, config, jax.random.key(2))
    for i in range(r.tokens.shape[0]):
        allowed = allowed_sets(row_logits(model, r, i), 1.5, config.top_k, config.top_p)
        assert allowed[np.arange(6), r.tokens[i]].all(), (i, r.tokens[i])
        assert allowed.sum(-1).max() < VOCAB  # the restriction is not vacuous
    assert len(np.unique(r.tokens)) > 6  # and sampling still has choices


def test_sample_logits_top_k_one_is_greedy():
    logits = jax.random.normal(jax.random.key(0), (5, 50))
    np.testing.assert_array_equal(sample_logits(jax.random.key(1), logits, temperature=2.0, top_k=1),
                                  jnp.argmax(logits, -1))
    np.testing.assert_array_equal(sample_logits(jax.random.key(1), logits, temperature=2.0, top_p=1e-6),
                                  jnp.argmax(logits, -1))


@pytest.mark.parametrize("controls", [dict(temperature=1.0), dict(temperature=0.7), dict(temperature=1.0, top_k=5),
                                      dict(temperature=0.0)])
def test_sample_with_logprobs_equals_sample_then_score(controls):
    # Temperature 1 takes the shared-normaliser path; the others sample and score separately.
    logits = 3.0 * jax.random.normal(jax.random.key(0), (8, 700))
    logits = logits.at[0, ::2].set(-jnp.inf)
    key = jax.random.key(1)
    tokens, logprobs = jax.jit(lambda k, x: sample_with_logprobs(k, x, **controls))(key, logits)
    np.testing.assert_array_equal(tokens, sample_logits(key, logits, **controls))
    np.testing.assert_allclose(logprobs, token_logprobs(logits, tokens), atol=1e-5)


def test_argmax_matches_numpy_with_ties_and_infinities():
    logits = np.asarray(jax.random.randint(jax.random.key(0), (64, 300), -3, 3), np.float32)  # many ties
    logits[0] = -np.inf
    logits[1, 7] = np.inf
    logits[2, 299] = 10.0  # the last id
    np.testing.assert_array_equal(argmax(jnp.asarray(logits)), np.argmax(logits, -1))
    assert int(argmax(jnp.full((1, 5), jnp.nan))[0]) in range(5)  # garbage in, still a valid id


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sample_logits_matches_softmax_frequencies(temperature):
    # 3 rows over a vocabulary that spans several search blocks with a ragged last one; some entries are -inf.
    vocab, draws = 700, 40_000
    logits = 2.0 * jax.random.normal(jax.random.key(0), (3, vocab))
    logits = logits.at[0, ::3].set(-jnp.inf).at[1, :690].add(-8.0).at[2, 255:257].add(6.0)
    keys = jax.random.split(jax.random.key(1), draws)
    tokens = np.asarray(jax.jit(jax.vmap(lambda k: sample_logits(k, logits, temperature=temperature)))(keys))
    probs = np.asarray(jax.nn.softmax(logits / temperature, axis=-1))
    for row in range(3):
        freq = np.bincount(tokens[:, row], minlength=vocab) / draws
        assert (freq[probs[row] == 0] == 0).all()  # -inf logits are never drawn
        # Every frequency within 5 binomial standard deviations (plus a floor for tiny probabilities).
        sigma = np.sqrt(probs[row] * (1 - probs[row]) / draws)
        np.testing.assert_array_less(np.abs(freq - probs[row]), 5 * sigma + 2e-4)


def hf_kept(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The tokens transformers' `TopKLogitsWarper` then `TopPLogitsWarper` keep (the independent reference), `[B, V]`
    bool."""
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    scores = torch.from_numpy(np.array(logits, np.float32))
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.isfinite(scores).numpy()


def tie_closure(logits: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """`kept` plus every token tied with its smallest kept logit: transformers' top-p keeps an arbitrary part of a
    tie at the boundary (whichever its sort puts last), `filter_logits` all of it."""
    return logits >= np.where(kept, logits, np.inf).min(-1, keepdims=True)


def boundary_is_ambiguous(logits: np.ndarray, top_k: int, top_p: float, tol: float = 1e-5) -> np.ndarray:
    """`[B]`: rows where the mass before some distinct logit value but the largest (in float64, after top-k) is
    within `tol` of top_p, so that float32 rounding decides whether that value is kept."""
    if top_p >= 1:
        return np.zeros(len(logits), bool)
    x = -np.sort(-logits.astype(np.float64), -1)  # decreasing
    if top_k:
        x = np.where(x >= x[:, min(top_k, x.shape[1]) - 1: min(top_k, x.shape[1])], x, -np.inf)
    probs = np.exp(x - x[:, :1])
    probs /= probs.sum(-1, keepdims=True)
    before = np.cumsum(probs, -1) - probs
    level_start = np.isfinite(x) & (x != np.roll(x, 1, -1))  # the first token of each distinct value
    level_start[:, 0] = False  # the largest is always kept (nothing before it)
    return np.any(level_start & (np.abs(before - top_p) < tol), -1)


def edge_case_logits(vocab: int = 300) -> np.ndarray:
    """Rows of `[N, vocab]` float32 logits: tie-free random ones first (`TIE_FREE` rows), then ties of every kind."""
    rng = np.random.default_rng(0)
    rows = [3.0 * rng.standard_normal((TIE_FREE, vocab))]
    rows.append(rng.integers(-3, 3, (60, vocab)).astype(np.float64))  # ties everywhere, at every boundary
    uniform = np.zeros((1, vocab))  # one big tie
    two_max = rng.standard_normal((1, vocab))
    two_max[0, [3, 200]] = 10.0  # two tied maxima
    peaked = rng.standard_normal((1, vocab))
    peaked[0, 7] = 60.0  # one-hot to float precision
    masked = 2.0 * rng.standard_normal((1, vocab))
    masked[0, ::2] = -np.inf  # half the vocabulary excluded already
    # Ties exactly at the k-th largest value for k = 1, 3, 5, 50, and a distribution with mass 0.5, 0.25, 0.25.
    kth_ties = np.sort(rng.standard_normal((4, vocab)), -1)[:, ::-1].copy()
    for row, k in zip(kth_ties, (1, 3, 5, 50), strict=True):
        row[k - 1: k + 2] = row[k - 1]
    halves = np.full((1, vocab), -np.inf)
    halves[0, [10, 20, 30]] = np.log([0.5, 0.25, 0.25])
    flat = 0.05 * rng.standard_normal((1, vocab))  # top-p sets beyond the 256 candidates: the full-sort path
    rows += [uniform, two_max, peaked, masked, kth_ties, halves, flat]
    return np.concatenate(rows).astype(np.float32)


TIE_FREE = 200
FILTERS = [(k, p) for k in (0, 1, 5, 50, 400) for p in (1.0, 0.95, 0.7, 1e-6) if (k, p) != (0, 1.0)]


def test_filter_logits_keeps_exactly_the_transformers_warpers_set():
    """The kept set of every top-k / top-p combination against transformers' warpers (`filter_logits` takes logits
    already divided by the temperature, as `TemperatureLogitsWarper` comes first): exactly on tie-free rows; on
    tied rows up to the tie at top-p's boundary that transformers splits arbitrarily (`tie_closure`); rows whose
    float64 top-p boundary lies within 1e-5 of top_p (float32 rounding decides) are skipped, and there must be few.
    Each filter runs on the whole batch and on every row alone (its own choice between the candidates and the full
    sort), and both paths occur."""
    logits = edge_case_logits()
    batched = jax.jit(filter_logits, static_argnames=("top_k", "top_p"))
    skipped, paths = 0, set()
    for top_k, top_p in FILTERS:
        one_row = jax.jit(jax.vmap(lambda row, k=top_k, p=top_p: filter_logits(row[None], top_k=k, top_p=p)[0]))
        ours = np.isfinite(np.asarray(batched(jnp.asarray(logits), top_k=top_k, top_p=top_p)))
        np.testing.assert_array_equal(np.isfinite(np.asarray(one_row(jnp.asarray(logits)))), ours)
        if top_k in (0, 400) and top_p < 1:  # top-p alone: which rows the 256 candidates settle
            candidates = np.sort(logits, -1)[:, -256:]
            mass = np.exp(candidates - logits.max(-1, keepdims=True)).sum(-1) / np.exp(
                logits - logits.max(-1, keepdims=True)).sum(-1)
            paths |= set((mass >= top_p).tolist())
        ref = hf_kept(logits, top_k, top_p)
        ambiguous = boundary_is_ambiguous(logits, top_k, top_p)
        skipped += ambiguous.sum()
        ok = ~ambiguous
        np.testing.assert_array_equal(ours[:TIE_FREE][ok[:TIE_FREE]], ref[:TIE_FREE][ok[:TIE_FREE]],
                                      err_msg=f"tie-free rows, top_k={top_k}, top_p={top_p}")
        if top_p >= 1:  # transformers' top-k is a threshold on the values: ties at the k-th value are all kept
            np.testing.assert_array_equal(ours, ref, err_msg=f"top_k={top_k}")
        np.testing.assert_array_equal(ours[ok], tie_closure(logits, ref)[ok],
                                      err_msg=f"top_k={top_k}, top_p={top_p}")
        assert ours.sum(-1).min() >= 1
    assert skipped <= 0.01 * len(FILTERS) * len(logits), skipped
    assert paths == {True, False}
    # The hand-made cases, spelled out: ties at the k-th value kept, the token crossing top_p kept,
    # the one after it not, a tie at top-p's boundary kept whole.
    row = jnp.asarray([[5.0, 4.0, 4.0, 4.0, 1.0, 0.0]])
    keep = lambda **kw: np.flatnonzero(np.isfinite(np.asarray(filter_logits(row, **kw)))[0]).tolist()
    assert keep(top_k=2) == [0, 1, 2, 3] and keep(top_k=1) == [0] and keep(top_k=5) == [0, 1, 2, 3, 4]
    probs = np.asarray(jax.nn.softmax(row))[0]  # 0.470, 0.173 (x3), 0.0086, 0.0032
    assert keep(top_p=float(probs[0])) == [0]  # the mass before token 1 is exactly top_p: not kept
    assert keep(top_p=float(probs[0]) + 1e-3) == [0, 1, 2, 3]  # token 1 crosses top_p, its ties come along
    assert keep(top_p=0.99) == [0, 1, 2, 3, 4] and keep(top_p=1e-6) == [0]  # 0.988 before token 4, 0.997 after
    assert keep(top_k=3, top_p=0.5) == [0, 1, 2, 3]  # top-p after the tie-inclusive top-k


@pytest.mark.parametrize("controls", [dict(top_k=20), dict(top_k=5), dict(top_p=0.7), dict(top_p=0.2),
                                      dict(top_k=50, top_p=0.9), dict(temperature=0.7, top_p=0.7)])
def test_top_k_top_p_sampling_frequencies(controls):
    """Draws with a fixed key, row by row, against the renormalised softmax over transformers' kept set: nothing
    outside it is ever drawn, and a chi-square statistic over the kept tokens stays within 5 standard deviations of
    its mean. The rows take every path: a draw among the candidates, over the vocabulary (row 2's 10-way tie at the
    top against top_k=5) and after a full sort (row 3, flat: top_p=0.7 keeps ~470 of its 700 tokens)."""
    controls = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **controls}
    vocab, draws = 700, 20_000
    logits = np.array(2.0 * jax.random.normal(jax.random.key(0), (4, vocab)))
    logits[2, 100:110] = logits[2].max()  # a 10-way tie at the top
    logits[3] *= 0.05
    keys = jax.random.split(jax.random.key(1), draws)
    draw = jax.jit(jax.vmap(lambda k, row: sample_logits(k, row, **controls), in_axes=(0, None)))
    scaled = logits / np.float32(controls["temperature"])
    kept = tie_closure(scaled, hf_kept(scaled, controls["top_k"], controls["top_p"]))
    for row in range(4):
        tokens = np.asarray(draw(keys, jnp.asarray(logits[row: row + 1])))[:, 0]
        probs = np.where(kept[row], np.exp(scaled[row] - scaled[row].max()), 0.0)
        probs /= probs.sum()
        counts = np.bincount(tokens, minlength=vocab)
        assert counts[~kept[row]].sum() == 0, np.flatnonzero(counts * ~kept[row])
        dof = kept[row].sum() - 1
        assert dof < vocab - 1  # the filter is not vacuous (dof 0: one kept token, every draw it)
        expected = draws * probs[kept[row]]
        chi2 = np.sum((counts[kept[row]] - expected) ** 2 / expected)
        assert abs(chi2 - dof) < 5 * np.sqrt(2 * dof) + 5, (row, chi2, dof)


def test_num_samples_layout_and_determinism(sampler):
    config = SamplingConfig(max_new_tokens=6, num_samples=3)
    a = sampler.generate(PROMPTS, config, jax.random.key(3))
    b = sampler.generate(PROMPTS, config, jax.random.key(3))
    c = sampler.generate(PROMPTS, config, jax.random.key(4))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.tokens, c.tokens)
    assert a.tokens.shape == (12, 6)
    np.testing.assert_array_equal(a.prompt_tokens, np.repeat(a.prompt_tokens[::3], 3, axis=0))
    for i, prompt in enumerate(PROMPTS):
        group = a.prompt_tokens[3 * i: 3 * i + 3]
        assert (group[:, -len(prompt):] == prompt).all()
    # Samples of one group differ (independent draws), greedy ones coincide.
    assert len({tuple(t) for t in a.tokens[:3]}) > 1
    g = sampler.generate(PROMPTS, SamplingConfig(max_new_tokens=6, temperature=0.0, num_samples=3),
                         jax.random.key(3))
    np.testing.assert_array_equal(g.tokens, np.repeat(g.tokens[::3], 3, axis=0))


@pytest.mark.parametrize("num_samples", [3, 4])  # 12 rows in a 16-row batch (padding rows), and exactly 16
def test_samples_share_their_prompts_prefill(sampler, num_samples):
    # The same rollout as sampling the prompts repeated num_samples times (one prefill row per sample), with a
    # prefill of one row per prompt: 4 prompts → 4 rows, not 16.
    config = SamplingConfig(max_new_tokens=6, num_samples=num_samples)
    shared = sampler.generate(PROMPTS, config, jax.random.key(7))
    repeated = [prompt for prompt in PROMPTS for _ in range(num_samples)]
    alone = sampler.generate(repeated, SamplingConfig(max_new_tokens=6), jax.random.key(7))
    np.testing.assert_array_equal(shared.tokens, alone.tokens)
    np.testing.assert_array_equal(shared.prompt_tokens, alone.prompt_tokens)
    np.testing.assert_allclose(shared.logprobs, alone.logprobs, atol=1e-5)
    # Programs of a 16-row batch: the shared prefill's bank of 4 rows, and alone's 16 (a row per slot).
    assert {k.bank_rows for k in sampler._programs if k.slots == 16 and k.spec.max_new_tokens == 6} == {4, 16}


def test_compiles_once_per_bucket(model):
    sampler = Sampler(model, prompt_buckets=(8, 32))
    config = SamplingConfig(max_new_tokens=4)
    rng = np.random.default_rng(0)
    for n, length in [(3, 5), (5, 8), (8, 2), (1, 7)]:  # batch ≤ 8, prompts ≤ 8: one bucket
        prompts = [rng.integers(1, VOCAB, rng.integers(1, length + 1)).tolist() for _ in range(n - 1)]
        sampler.generate([*prompts, [1] * length], config, jax.random.key(n))
    assert sampler.num_traces == 2  # one prefill, one decode
    sampler.generate([[1] * 20], config, jax.random.key(0))  # the next prompt bucket
    sampler.generate([[2] * 9, [3]], config, jax.random.key(1))
    assert sampler.num_traces == 4
    assert len(sampler._programs) == 2
    assert all(p.decode._cache_size() == 1 and p.prefill._cache_size() == 1 for p in sampler._programs.values())


def test_params_override_equals_updated_model(model):
    other = make_model(seed=1)
    sampler = Sampler(model)
    config = SamplingConfig(max_new_tokens=6, temperature=0.8)
    own = sampler.generate(PROMPTS, config, jax.random.key(5))
    traces = sampler.num_traces
    _, new_state = nnx.split(other)
    via_params = sampler.generate(PROMPTS, config, jax.random.key(5), params=new_state)
    assert sampler.num_traces == traces  # new values, same programs
    reference = Sampler(other).generate(PROMPTS, config, jax.random.key(5))
    for x, y in zip(via_params, reference, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(own.tokens, via_params.tokens)
    # The model's own state is untouched by the override.
    np.testing.assert_array_equal(sampler.generate(PROMPTS, config, jax.random.key(5)).tokens, own.tokens)


@pytest.mark.parametrize("axes", [dict(data=8), dict(data=4, tensor=2), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_greedy_equals_one_device(model, sampler, axes):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (forced CPU) devices")
    config = SamplingConfig(max_new_tokens=8, temperature=0.0, num_samples=2)
    single = sampler.generate(PROMPTS, config, jax.random.key(0))
    sharded_sampler = Sampler(model, mesh=make_mesh(**axes), pad_token_id=PAD)
    r = sharded_sampler.generate(PROMPTS, config, jax.random.key(0))
    np.testing.assert_array_equal(r.tokens, single.tokens)
    np.testing.assert_allclose(r.logprobs, single.logprobs, atol=1e-5)
    prog = next(iter(sharded_sampler._programs.values()))
    assert prog.prompt_sharding.spec[0] is not None  # the batch really is split
    # Samples sharing their prompt's prefill (4 prompts → 8 prefill rows, 12 rows padded to 16), sharded alike.
    config = SamplingConfig(max_new_tokens=8, temperature=0.0, num_samples=3)
    r = sharded_sampler.generate(PROMPTS, config, jax.random.key(0))
    np.testing.assert_array_equal(r.tokens, np.repeat(single.tokens[::2], 3, axis=0))
    np.testing.assert_allclose(r.logprobs, np.repeat(single.logprobs[::2], 3, axis=0), atol=1e-5)


@pytest.mark.parametrize("prompts, config, match", [
    ([], SamplingConfig(4), "non-empty"),
    ([[1, 2], []], SamplingConfig(4), r"prompts\[1\] is empty"),
    ([[1, VOCAB]], SamplingConfig(4), "outside the vocabulary"),
    ([[-1, 2]], SamplingConfig(4), "outside the vocabulary"),
    ([[1] * 250], SamplingConfig(8), "does not fit"),
    ([[1]], SamplingConfig(4, eos_token_ids=(VOCAB,)), "eos_token_ids"),
])
def test_bad_inputs_raise_before_compiling(model, prompts, config, match):
    sampler = Sampler(model)
    with pytest.raises(ValueError, match=match):
        sampler.generate(prompts, config, jax.random.key(0))
    assert sampler.num_traces == 0


def test_prompt_longer_than_max_cache_length(model):
    sampler = Sampler(model, max_cache_length=24)
    with pytest.raises(ValueError, match="max_cache_length=24"):
        sampler.generate([[1] * 20], SamplingConfig(8), jax.random.key(0))
    assert sampler.num_traces == 0
    r = sampler.generate([[1] * 16], SamplingConfig(8, temperature=0.0), jax.random.key(0))
    free = Sampler(model).generate([[1] * 16], SamplingConfig(8, temperature=0.0), jax.random.key(0))
    np.testing.assert_array_equal(r.tokens, free.tokens)


def test_prompt_bucket_is_the_next_default_bucket():
    assert [prompt_bucket(n) for n in (1, 16, 17, 100, 1024, 1025, 32768)] == [16, 16, 32, 128, 1024, 2048, 32768]
    assert prompt_bucket(40_000) == 40_000 and prompt_bucket(np.int64(3)) == 16
    for bad in (0, -1, True, 2.5, "8"):
        with pytest.raises(ValueError, match="longest"):
            prompt_bucket(bad)


def test_prompt_length_pads_to_exactly_that_many_columns(model, sampler):
    config = SamplingConfig(max_new_tokens=6, temperature=0.0)
    bucketed = sampler.generate(PROMPTS, config, jax.random.key(0))  # longest 12: the 16 bucket
    for length in (12, 20, 40):
        r = sampler.generate(PROMPTS, config, jax.random.key(0), prompt_length=length)
        assert r.prompt_tokens.shape == (len(PROMPTS), length)
        for i, prompt in enumerate(PROMPTS):
            np.testing.assert_array_equal(r.prompt_tokens[i, length - len(prompt):], prompt)
            assert r.prompt_mask[i].sum() == len(prompt) and (r.prompt_tokens[i, : length - len(prompt)] == PAD).all()
        # Padding is masked out: the same completions as with the bucket's padding.
        np.testing.assert_array_equal(r.tokens, bucketed.tokens)
        np.testing.assert_allclose(r.logprobs, bucketed.logprobs, atol=1e-5)
    # An explicit length beats the constructor's buckets, and the max_cache_length clamp still applies.
    assert Sampler(model, prompt_buckets=(64,)).generate(PROMPTS, config, jax.random.key(0),
                                                         prompt_length=12).prompt_tokens.shape == (4, 12)
    clamped = Sampler(model, max_cache_length=30).generate(PROMPTS, config, jax.random.key(0), prompt_length=28)
    assert clamped.prompt_tokens.shape == (4, 24)  # 30 - 6 new tokens
    np.testing.assert_array_equal(clamped.tokens, bucketed.tokens)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_length=11), r"prompt_length=11 is shorter than the longest prompt \(12 tokens\)"),
    (dict(prompt_length=12.0), "prompt_length=12.0 must be an int"),
    (dict(prompt_length=True), "prompt_length=True must be an int"),
    (dict(chunk_size=0), "chunk_size=0"),
    (dict(chunk_size=2.0), "chunk_size=2.0"),
    (dict(chunk_size=False), "chunk_size=False"),
])
def test_generate_argument_validation(model, kwargs, match):
    sampler = Sampler(model)
    with pytest.raises(ValueError, match=match):
        sampler.generate(PROMPTS, SamplingConfig(4), jax.random.key(0), **kwargs)
    assert sampler.num_traces == 0


def test_chunking_changes_no_token(model):
    """`chunk_size` bounds the prompts per call and nothing else: every chunk is padded to the whole batch's prompt
    length (equal chunks share one program), and each sequence draws from its own stream (its index in the whole
    rollout), so the chunks' rollouts concatenated are the unchunked rollout."""
    prompts = [[5, 17, 3], [11, 12], [60] * 20, [i % VOCAB + 1 for i in range(9)], [7, 8, 9, 10], [3]]
    sampler = Sampler(model, pad_token_id=PAD)
    config = SamplingConfig(max_new_tokens=6, num_samples=2)
    key = jax.random.key(7)
    chunked = sampler.generate(prompts, config, key, chunk_size=2)
    # Chunks 0 and 2 alone would pad to 16, chunk 1 to 32: all are padded to the batch's 32, one program.
    assert chunked.prompt_tokens.shape == (12, 32) and len(sampler._programs) == 1 and sampler.num_traces == 2
    whole = sampler.generate(prompts, config, key, prompt_length=32)
    for chunk_size in (2, 4, 6, 9):  # 4: a smaller last chunk
        r = chunked if chunk_size == 2 else sampler.generate(prompts, config, key, chunk_size=chunk_size)
        np.testing.assert_array_equal(r.tokens, whole.tokens, err_msg=f"chunk_size={chunk_size}")
        np.testing.assert_allclose(r.logprobs, whole.logprobs, atol=1e-5, err_msg=f"chunk_size={chunk_size}")
        for name in ("prompt_tokens", "prompt_mask", "mask", "lengths", "finish_reason"):
            np.testing.assert_array_equal(getattr(r, name), getattr(whole, name), err_msg=name)
    # A chunk sampled on its own is not a part of the whole: its sequences are numbered from 0.
    alone = sampler.generate(prompts[2:4], config, key, prompt_length=32)
    assert not np.array_equal(alone.tokens, whole.tokens[4:8])
    r = sampler.generate(prompts, config, key, chunk_size=4, prompt_length=40)
    assert r.tokens.shape == (12, 6) and r.prompt_tokens.shape == (12, 40)


def test_concat_rollouts_checks_widths(sampler):
    a = sampler.generate(PROMPTS[:2], SamplingConfig(max_new_tokens=6), jax.random.key(0))
    b = sampler.generate(PROMPTS[2:], SamplingConfig(max_new_tokens=6), jax.random.key(1))
    both = concat_rollouts([a, b])
    for name, x, y, z in zip(both._fields, a, b, both, strict=True):
        np.testing.assert_array_equal(z, np.concatenate([x, y]), err_msg=name)
    longer = sampler.generate(PROMPTS[:1], SamplingConfig(max_new_tokens=7), jax.random.key(0))
    with pytest.raises(ValueError, match="trailing shape of tokens"):
        concat_rollouts([a, longer])
    wider = sampler.generate(PROMPTS[:1], SamplingConfig(max_new_tokens=6), jax.random.key(0), prompt_length=20)
    with pytest.raises(ValueError, match="trailing shape of prompt_tokens"):
        concat_rollouts([a, wider])
    with pytest.raises(ValueError, match="at least one"):
        concat_rollouts([])


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_new_tokens=4, temperature=-1.0), "temperature=-1.0"),
    (dict(max_new_tokens=4, top_k=-2), "top_k=-2"),
    (dict(max_new_tokens=4, top_p=0.0), "top_p=0.0"),
    (dict(max_new_tokens=4, top_p=1.5), "top_p=1.5"),
    (dict(max_new_tokens=4, num_samples=0), "num_samples=0"),
    (dict(max_new_tokens=4, eos_token_ids=(-3,)), "eos_token_ids"),
])
def test_sampling_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(pad_token_id=VOCAB), "pad_token_id"),
    (dict(prompt_buckets=(32, 16)), "prompt_buckets"),
    (dict(max_cache_length=1), "max_cache_length=1"),
    (dict(batch_multiple=0), "batch_multiple=0"),
])
def test_sampler_argument_validation(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampler(model, **kwargs)
    with pytest.raises(TypeError, match="prompt_length"):  # functions gave way to generate(prompt_length=...)
        Sampler(model, prompt_buckets=lambda n: 64)
