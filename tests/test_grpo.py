"""The GRPO objective (sfpo_jax.rl.grpo) against NumPy re-derivations, finite differences and masking invariants."""

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from sfpo_jax.rl import grpo

AGGS = grpo.AGGREGATIONS
CLIPS = {
    "symmetric": dict(clip_low=0.2, clip_high=0.2),
    "clip-higher": dict(clip_low=0.2, clip_high=0.28),
    "dual-clip": dict(clip_low=0.2, clip_high=0.2, dual_clip=1.5),
}
B, T = 5, 7


# ------------------------------------------------------------------------------------------ NumPy references


def np_group_advantages(r, g, scale_by_std=True, eps=1e-6):
    out = np.zeros(len(r))
    for start in range(0, len(r), g):
        grp = np.asarray(r[start:start + g], np.float64)
        if g == 1 or np.all(grp == grp[0]):
            continue
        a = grp - grp.mean()
        if scale_by_std:
            a = a / (np.std(grp, ddof=1) + eps)
        out[start:start + g] = a
    return out


def np_token_loss(lp, old, a, clip_low, clip_high, dual_clip):
    """Piecewise form of the clipped surrogate, written independently of max(−Aρ, −A·clip(ρ))."""
    rho = math.exp(min(max(lp - old, -20.0), 20.0))
    if a >= 0:
        loss = -a * min(rho, 1 + clip_high)
    else:
        loss = -a * max(rho, 1 - clip_low)
        if dual_clip is not None:
            loss = min(loss, -a * dual_clip)
    return loss, rho


def np_kl(lp, ref, est):
    d = lp - ref
    if est == "k1":
        return d
    if est == "k2":
        return 0.5 * d * d
    x = min(max(-d, -20.0), 20.0)
    return min(max(math.exp(x) - x - 1, -10.0), 10.0)


def np_aggregate(vals, mask, agg, num_tokens=None, num_seqs=None, loss_norm=None):
    rows = [[v for v, m in zip(vr, mr, strict=True) if m] for vr, mr in zip(vals, mask, strict=True)]
    if agg == "token-mean":
        n = num_tokens if num_tokens is not None else max(sum(len(r) for r in rows), 1)
        return sum(sum(r) for r in rows) / n
    nonempty = [r for r in rows if r]
    s = num_seqs if num_seqs is not None else max(len(nonempty), 1)
    if agg == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in nonempty) / s
    if agg == "seq-mean-token-sum":
        return sum(sum(r) for r in nonempty) / s
    c = loss_norm if loss_norm is not None else len(mask[0])
    return sum(sum(r) for r in nonempty) / c  # verl: no 1/N_seq (see verl_agg_loss)


def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode, loss_scale_factor=None):
    """verl's `core_algos.agg_loss` (volcengine/verl, verl/trainer/ppo/core_algos.py), written out in numpy: the
    reference that `grpo.aggregate` must match (on batches without empty completions, where verl's
    seq-mean-token-mean would divide by zero)."""
    loss_mat, loss_mask = np.asarray(loss_mat, np.float64), np.asarray(loss_mask, np.float64)
    if loss_agg_mode == "token-mean":
        return (loss_mat * loss_mask).sum() / loss_mask.sum()
    if loss_agg_mode == "seq-mean-token-sum":
        return np.mean(np.sum(loss_mat * loss_mask, axis=-1))
    if loss_agg_mode == "seq-mean-token-mean":
        return np.mean(np.sum(loss_mat * loss_mask, axis=-1) / np.sum(loss_mask, axis=-1))
    assert loss_agg_mode == "seq-mean-token-sum-norm"
    seq_losses = np.sum(loss_mat * loss_mask, axis=-1)
    return np.sum(seq_losses) / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)


def np_policy_loss(lp, old, adv, mask, *, clip_low=0.2, clip_high=0.2, dual_clip=None, agg="token-mean",
                   ref_logp=None, kl_coef=0.0, kl_estimator="k3", entropy=None, entropy_coef=0.0, **norms):
    lp, old, mask = np.asarray(lp, np.float64), np.asarray(old, np.float64), np.asarray(mask, bool)
    adv = np.asarray(adv, np.float64)
    adv = np.broadcast_to(adv[:, None], mask.shape) if adv.ndim == 1 else adv
    pg = np.zeros(mask.shape)
    rho = np.ones(mask.shape)
    hi = lo = dual = 0
    for b, t in itertools.product(*map(range, mask.shape)):
        if not mask[b, t]:
            continue
        pg[b, t], rho[b, t] = np_token_loss(lp[b, t], old[b, t], adv[b, t], clip_low, clip_high, dual_clip)
        hi += adv[b, t] > 0 and rho[b, t] > 1 + clip_high
        lo += adv[b, t] < 0 and rho[b, t] < 1 - clip_low
        if dual_clip is not None:
            capped_by_clip = -adv[b, t] * max(rho[b, t], 1 - clip_low)
            dual += adv[b, t] < 0 and capped_by_clip > -adv[b, t] * dual_clip
    n = max(mask.sum(), 1)
    pg_loss = np_aggregate(pg, mask, agg, **norms)
    loss = pg_loss
    metrics = dict(pg_loss=pg_loss, clip_frac_high=hi / n, clip_frac_low=lo / n, clip_frac=(hi + lo) / n,
                   dual_clip_frac=dual / n, ppo_kl=(old - lp)[mask].sum() / n,
                   approx_kl=0.5 * ((lp - old)[mask] ** 2).sum() / n, ratio_mean=rho[mask].mean(),
                   ratio_min=rho[mask].min(), ratio_max=rho[mask].max())
    if ref_logp is not None:
        kl = np.array([[np_kl(lp[b, t], ref_logp[b, t], kl_estimator) if mask[b, t] else 0.0 for t in range(T)]
                       for b in range(B)])
        metrics["kl"] = np_aggregate(kl, mask, agg, **norms)
        loss += kl_coef * metrics["kl"]
    if entropy is not None:
        entropy = np.asarray(entropy, np.float64)
        loss -= entropy_coef * np_aggregate(entropy, mask, agg, **norms)
        metrics["entropy"] = entropy[mask].mean()
    metrics["loss"] = loss
    return loss, metrics


def np_logprobs_entropy(logits, targets, mask, temperature=1.0):
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    logp_all = z - np.log(np.exp(z).sum(-1, keepdims=True))
    p = np.exp(logp_all)
    logp = np.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
    ent = -(p * np.where(p > 0, logp_all, 0.0)).sum(-1)
    return np.where(mask, logp, 0.0), np.where(mask, ent, 0.0)


# ----------------------------------------------------------------------------------------------- fixtures


def make_batch(seed=0, b=B, t=T, per_token_adv=False):
    """Log-probs spread widely enough that every clip branch (and the dual clip at 1.5) is exercised."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, size=b)
    lengths[-1] = 0  # an empty completion: ignored by the seq-mean modes' default count
    mask = np.arange(t)[None, :] < lengths[:, None]
    old = -rng.uniform(0.1, 3.0, size=(b, t))
    lp = old + rng.normal(0.0, 0.45, size=(b, t))
    adv = rng.normal(size=(b, t) if per_token_adv else (b,))
    ref = old + rng.normal(0.0, 0.3, size=(b, t))
    ent = rng.uniform(0.0, 2.0, size=(b, t))
    return dict(lp=lp.astype(np.float32), old=old.astype(np.float32), adv=adv.astype(np.float32), mask=mask,
                ref=ref.astype(np.float32), ent=ent.astype(np.float32))


LOSS_FIELDS = {f.name for f in dataclasses.fields(grpo.LossConfig)}


def policy_loss(logp, old_logp, advantages, mask, **kw):
    """`grpo.policy_loss` with the `LossConfig` fields among ``kw`` (the entropy bonus off unless given)."""
    config = grpo.LossConfig(**{"entropy_coef": 0.0, **{k: kw.pop(k) for k in list(kw) if k in LOSS_FIELDS}})
    return grpo.policy_loss(logp, old_logp, advantages, mask, config, **kw)


def call(d, **kw):
    return policy_loss(d["lp"], d["old"], d["adv"], d["mask"], **kw)


# ---------------------------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("group_size", [1, 2, 4, 8])
def test_group_advantages_match_numpy(group_size, scale_by_std):
    rng = np.random.default_rng(group_size)
    r = rng.choice([0.0, 0.1, 1.0], size=6 * group_size)
    r[:group_size] = 0.1  # a zero-variance group whose float mean is not exactly 0.1
    r[group_size:2 * group_size] = rng.normal(size=group_size)
    got = np.asarray(grpo.group_advantages(r, group_size, scale_by_std=scale_by_std))
    assert got.dtype == np.float32 and got.shape == r.shape
    np.testing.assert_allclose(got, np_group_advantages(r, group_size, scale_by_std), rtol=1e-5, atol=1e-6)
    assert np.all(got[:group_size] == 0.0)  # exactly, not ~1e-8/eps


def test_group_advantages_unbiased_std_and_dtype():
    # G=2, rewards (0, 1): mean 0.5, unbiased std sqrt(0.5) -> ±0.5/sqrt(0.5) = ±0.7071 (population std: ±1).
    got = grpo.group_advantages(jnp.array([0, 1, 1, 1], jnp.int32), 2, eps=0.0)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), [-math.sqrt(0.5), math.sqrt(0.5), 0.0, 0.0], rtol=1e-6)
    got = grpo.group_advantages(jnp.array([0.0, 1.0], jnp.bfloat16), 2)
    assert got.dtype == jnp.float32


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([2, 3, 4]), st.integers(1, 3), st.data())
def test_group_advantages_properties(group_size, n_groups, data):
    r = np.array(data.draw(st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0]), min_size=group_size * n_groups,
                                    max_size=group_size * n_groups)), np.float32)
    adv = np.asarray(grpo.group_advantages(r, group_size)).reshape(n_groups, group_size)
    rg = r.reshape(n_groups, group_size)
    for a, g in zip(adv, rg, strict=True):
        assert abs(a.sum()) < 1e-4
        if np.all(g == g[0]):
            assert np.all(a == 0.0)
        else:
            # unbiased std of the normalised advantages is 1 up to eps / std
            assert abs(np.std(a, ddof=1) - 1.0) < 1e-4
            # ordering is preserved, and an affine change of the rewards changes nothing
            assert np.all(np.argsort(a, kind="stable") == np.argsort(g, kind="stable"))
    shifted = np.asarray(grpo.group_advantages(3.0 * r + 2.0, group_size)).reshape(n_groups, group_size)
    np.testing.assert_allclose(shifted, adv, atol=1e-4)


@pytest.mark.parametrize("args, kwargs, match", [
    ((np.zeros(6), 4), {}, "not divisible by group_size=4"),
    ((np.zeros(6), 0), {}, "group_size"),
    ((np.zeros(6), True), {}, "group_size"),
    ((np.zeros(6), 2.0), {}, "group_size"),
    ((np.zeros(6), 2), dict(eps=-1.0), "eps"),
    ((np.zeros((2, 3)), 3), {}, "1-D"),
])
def test_group_advantages_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        grpo.group_advantages(*args, **kwargs)


# --------------------------------------------------------------------------------------------- policy loss


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_matches_numpy(agg, clip, kl_estimator):
    d = make_batch(seed=AGGS.index(agg), per_token_adv=kl_estimator == "k2")
    kw = dict(agg=agg, ref_logp=d["ref"], kl_coef=0.05, kl_estimator=kl_estimator, entropy=d["ent"],
              entropy_coef=0.01, **CLIPS[clip])
    loss, metrics = call(d, **kw)
    ref_loss, ref_metrics = np_policy_loss(d["lp"], d["old"], d["adv"], d["mask"], **kw)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-5, atol=1e-6)
    assert set(metrics) == set(ref_metrics)
    for k, v in ref_metrics.items():
        assert metrics[k].dtype == jnp.float32 and metrics[k].shape == (), k
        np.testing.assert_allclose(float(metrics[k]), v, rtol=2e-5, atol=1e-6, err_msg=k)


def test_fixture_exercises_every_branch():
    """Guard against the parity tests above passing on data that never clips."""
    d = make_batch(seed=0)
    _, m = call(d, dual_clip=1.5)
    assert m["clip_frac_high"] > 0 and m["clip_frac_low"] > 0 and m["dual_clip_frac"] > 0
    _, m = call(d, clip_high=0.28)
    assert m["clip_frac_high"] > 0


def test_dual_clip_caps_negative_advantage_loss():
    lp = jnp.log(jnp.array([[5.0, 0.5, 5.0, 1.0]]))
    adv = jnp.array([[-1.0, -1.0, 1.0, -2.0]])
    mask = jnp.ones((1, 4), bool)
    loss, m = policy_loss(lp, jnp.zeros((1, 4)), adv, mask, dual_clip=3.0, agg="seq-mean-token-sum")
    # ρ=5, A=−1: min(max(5, 5·), 3) = 3;  ρ=0.5, A=−1: max(0.5, 0.8) = 0.8;  ρ=5, A=1: −1.2;  ρ=1, A=−2: 2.
    np.testing.assert_allclose(float(loss), 3.0 + 0.8 - 1.2 + 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(m["dual_clip_frac"]), 0.25)
    g = jax.grad(lambda x: policy_loss(x, jnp.zeros((1, 4)), adv, mask, dual_clip=3.0)[0])(lp)
    assert np.all(np.asarray(g)[0, :3] == 0.0) and np.asarray(g)[0, 3] != 0.0


def test_kl_estimators_and_clamps():
    lp = jnp.array([-1.0, -2.0, -0.5, -40.0, -0.5])
    ref = jnp.array([-1.5, -1.0, -5.0, -1.0, -30.0])
    d = np.asarray(lp - ref, np.float64)
    np.testing.assert_allclose(np.asarray(grpo.kl_estimate(lp, ref, "k1")), d, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grpo.kl_estimate(lp, ref, "mse")), 0.5 * d**2, rtol=1e-6)
    k3 = np.asarray(grpo.kl_estimate(lp, ref, "low_var_kl"))
    assert np.all(k3 >= 0)
    np.testing.assert_allclose(k3[:3], np.exp(-d[:3]) + d[:3] - 1, rtol=1e-6)
    # Both tails are clamped at 10 as in verl (unclamped, −d = 39 would give e^39).
    assert k3[3] == 10.0 and k3[4] == 10.0


def test_seq_mean_aggregations_differ_as_documented():
    """One long and one short completion with per-token values 1 and 3: each mode's closed form."""
    vals = jnp.array([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 1], [1, 0, 0, 0]])
    expect = {"token-mean": 7 / 5, "seq-mean-token-mean": (1 + 3) / 2, "seq-mean-token-sum": (4 + 3) / 2,
              "seq-mean-token-sum-norm": (4 + 3) / 4}
    for agg, v in expect.items():
        np.testing.assert_allclose(float(grpo.aggregate(vals, mask, agg)), v, rtol=1e-6, err_msg=agg)
    np.testing.assert_allclose(float(grpo.aggregate(vals, mask, "seq-mean-token-sum-norm", loss_norm=7.0)),
                               7 / 7, rtol=1e-6)
    assert float(grpo.aggregate(vals, jnp.zeros_like(mask), "seq-mean-token-mean")) == 0.0


@pytest.mark.parametrize("agg", AGGS)
def test_aggregate_matches_verls_agg_loss(agg):
    """Every mode against verl's own formula, on a ragged batch (no empty completion) and with a set normaliser."""
    rng = np.random.default_rng(3)
    vals = rng.normal(size=(6, 9)).astype(np.float32)
    mask = np.arange(9)[None] < rng.integers(1, 10, 6)[:, None]
    np.testing.assert_allclose(float(grpo.aggregate(vals, mask, agg)), verl_agg_loss(vals, mask, agg), rtol=1e-5)
    if agg == "seq-mean-token-sum-norm":
        np.testing.assert_allclose(float(grpo.aggregate(vals, mask, agg, loss_norm=512.0, num_seqs=6)),
                                   verl_agg_loss(vals, mask, agg, loss_scale_factor=512.0), rtol=1e-5)


@pytest.mark.parametrize("agg", AGGS)
def test_microbatch_sums_equal_full_batch(agg):
    """Micro-batch losses given the full batch's denominator sum to the full-batch loss, and so do the grads."""
    d = make_batch(seed=7, b=8)
    kw = dict(agg=agg, dual_clip=2.0, kl_coef=0.1, entropy_coef=0.01)
    mask = d["mask"]
    # Both denominators, always, as a trainer that does not branch on `agg` passes them: each mode reads its own.
    norm = dict(num_tokens=int(mask.sum()), num_seqs=int((mask.sum(1) > 0).sum()))

    def loss_fn(lp, ent, sl, **norms):
        return policy_loss(lp, d["old"][sl], d["adv"][sl], mask[sl], ref_logp=d["ref"][sl], entropy=ent,
                                **kw, **norms)[0]

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1))
    full, (g_lp, g_ent) = grad_fn(d["lp"], d["ent"], slice(None))
    parts = [grad_fn(d["lp"][i:i + 2], d["ent"][i:i + 2], slice(i, i + 2), **norm) for i in range(0, 8, 2)]
    np.testing.assert_allclose(sum(float(p[0]) for p in parts), float(full), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.concatenate([p[1][0] for p in parts]), g_lp, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.concatenate([p[1][1] for p in parts]), g_ent, rtol=1e-5, atol=1e-8)
    # Without the global denominator the micro-batch token-means do not add up (the point of num_tokens).
    if agg == "token-mean":
        naive = np.mean([float(grad_fn(d["lp"][i:i + 2], d["ent"][i:i + 2], slice(i, i + 2))[0])
                         for i in range(0, 8, 2)])
        assert abs(naive - float(full)) > 1e-4


# ------------------------------------------------------------------------------------------------ gradients


def test_gradient_matches_analytic_form():
    """token-mean, no extras: ∂L/∂logp_t = −A ρ_t / N on unclipped tokens and exactly 0 on clipped ones."""
    d = make_batch(seed=3)
    g = np.asarray(jax.grad(lambda lp: call({**d, "lp": lp}, clip_high=0.28)[0])(d["lp"]), np.float64)
    mask, adv = d["mask"], np.broadcast_to(d["adv"][:, None], d["mask"].shape).astype(np.float64)
    rho = np.exp(d["lp"].astype(np.float64) - d["old"])
    clipped = ((adv > 0) & (rho > 1.28)) | ((adv < 0) & (rho < 0.8))
    expect = np.where(mask & ~clipped, -adv * rho / mask.sum(), 0.0)
    np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-9)
    assert clipped[mask].any() and (~clipped[mask]).any()


@pytest.mark.parametrize("agg, kl_estimator", list(zip(AGGS, ["k1", "k2", "k3", "k3"], strict=True)))
def test_gradient_matches_finite_differences_float64(agg, kl_estimator):
    with jax.enable_x64(True):
        d = {k: np.asarray(v, np.float64) if v.dtype == np.float32 else v for k, v in make_batch(seed=11).items()}

        def f(lp, ent):
            return policy_loss(lp, d["old"], d["adv"], d["mask"], agg=agg, dual_clip=1.5, clip_high=0.28,
                                    ref_logp=d["ref"], kl_coef=0.3, kl_estimator=kl_estimator, entropy=ent,
                                    entropy_coef=0.05)[0]

        f_jit = jax.jit(f)
        g_lp, g_ent = jax.jit(jax.grad(f, argnums=(0, 1)))(d["lp"], d["ent"])
        assert g_lp.dtype == jnp.float64
        h = 1e-6
        for (b, t), which in itertools.product(zip(*np.nonzero(d["mask"]), strict=True), (0, 1)):
            args = [d["lp"].copy(), d["ent"].copy()]
            args[which][b, t] += h
            up = float(f_jit(*args))
            args[which][b, t] -= 2 * h
            down = float(f_jit(*args))
            fd = (up - down) / (2 * h)
            np.testing.assert_allclose(float((g_lp, g_ent)[which][b, t]), fd, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------------- masking


@pytest.mark.parametrize("agg", AGGS)
def test_masked_positions_are_inert(agg):
    d = make_batch(seed=5, per_token_adv=True)
    kw = dict(agg=agg, dual_clip=2.0, kl_coef=0.1, entropy_coef=0.01)

    def loss_and_grads(d):
        fn = lambda lp, ent: policy_loss(lp, d["old"], d["adv"], d["mask"], ref_logp=d["ref"], entropy=ent,
                                              **kw)
        (loss, metrics), grads = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(d["lp"], d["ent"])
        return loss, metrics, grads

    loss, metrics, grads = loss_and_grads(d)
    masked = ~d["mask"]
    for poison in (np.nan, np.inf, -np.inf, 1e30):
        bad = {k: np.where(masked, np.float32(poison), v) if k != "mask" else v for k, v in d.items()}
        loss2, metrics2, grads2 = loss_and_grads(bad)
        assert float(loss2) == float(loss)
        for k in metrics:
            assert float(metrics2[k]) == float(metrics[k]), k
        for g, g2 in zip(grads, grads2, strict=True):
            assert np.all(np.isfinite(g2))
            np.testing.assert_array_equal(np.asarray(g2), np.asarray(g))
            assert np.all(np.asarray(g2)[masked] == 0.0)


def test_all_masked_batch_is_finite_and_zero():
    d = make_batch(seed=1)
    d["mask"] = np.zeros_like(d["mask"])
    for agg in AGGS:
        loss, m = call(d, agg=agg, entropy=d["ent"], entropy_coef=0.01)
        assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in m.values()), agg


# ------------------------------------------------------------------------------------- log-probs, entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_logprobs_and_entropy_match_numpy(dtype, temperature):
    rng = np.random.default_rng(0)
    b, t, v = 3, 5, 37
    logits = jnp.asarray(rng.normal(0.0, 3.0, size=(b, t, v)), dtype)
    targets = rng.integers(0, v, size=(b, t))
    mask = np.arange(t)[None, :] < np.array([5, 2, 0])[:, None]
    targets[~mask] = -100  # padding ids at masked positions must be harmless
    logp, ent = grpo.token_logprobs_and_entropy(logits, targets, mask, temperature=temperature)
    assert logp.dtype == ent.dtype == jnp.float32 and logp.shape == ent.shape == (b, t)
    # The reference sees exactly the logits JAX sees (bf16-rounded, then exact in float64).
    ref_logp, ref_ent = np_logprobs_entropy(np.asarray(logits.astype(jnp.float32)), np.where(mask, targets, 0),
                                            mask, temperature)
    np.testing.assert_allclose(np.asarray(logp), ref_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), ref_ent, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(logp)[~mask] == 0.0) and np.all(np.asarray(ent)[~mask] == 0.0)


def _autodiff_logprobs_entropy(logits, targets, mask, temperature=1.0):
    """token_logprobs_and_entropy written as plain autodiff of a log-softmax: the reference for its hand-written VJP."""
    m = mask.astype(bool)
    logp_all = jax.nn.log_softmax(jnp.where(m[..., None], logits, 0.0) / temperature, axis=-1)
    logp = jnp.take_along_axis(logp_all, jnp.where(m, targets, 0)[..., None], axis=-1)[..., 0]
    finite = jnp.isfinite(logp_all)
    safe = jnp.where(finite, logp_all, 0.0)
    ent = -jnp.sum(jnp.where(finite, jnp.exp(safe) * safe, 0.0), axis=-1)
    return jnp.where(m, logp, 0.0), jnp.where(m, ent, 0.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_gradient_matches_autodiff_and_finite_differences(temperature):
    rng = np.random.default_rng(4)
    b, t, v = 2, 5, 13
    mask = np.arange(t)[None, :] < np.array([5, 3])[:, None]
    targets = np.where(mask, rng.integers(0, v - 2, size=(b, t)), -100)
    w_logp, w_ent = rng.normal(size=(2, b, t))  # cotangents of both outputs: the entropy's gradient is checked too

    def weighted(fn, logits):
        logp, ent = fn(logits, targets, mask, temperature=temperature)
        return jnp.sum(w_logp * logp + w_ent * ent)

    ours = functools.partial(weighted, grpo.token_logprobs_and_entropy)
    with jax.enable_x64(True):
        logits = jnp.asarray(rng.normal(0.0, 2.0, size=(b, t, v)))
        check_grads(ours, (logits,), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
    logits = rng.normal(0.0, 2.0, size=(b, t, v)).astype(np.float32)
    logits[..., -2:] = -np.inf  # a masked vocabulary: zero gradient there, finite everywhere
    logits[~mask] = np.nan  # masked positions: zero gradient whatever they hold
    g = np.asarray(jax.grad(ours)(jnp.asarray(logits)))
    ref = np.asarray(jax.grad(functools.partial(weighted, _autodiff_logprobs_entropy))(jnp.asarray(logits)))
    assert np.all(np.isfinite(g)) and np.all(g[~mask] == 0.0) and np.all(g[..., -2:] == 0.0)
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)
    # bf16 logits get a bf16 gradient of the same values
    g16 = jax.grad(ours)(jnp.asarray(np.where(np.isfinite(logits), logits, 0.0), jnp.bfloat16))
    assert g16.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g16, np.float32)))


def test_logprobs_with_neg_inf_logits_and_poisoned_masked_logits():
    """−inf logits at real positions (e.g. masked vocabulary) and NaN/inf logits at masked positions."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 11)).astype(np.float32)
    logits[..., -3:] = -np.inf
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    logits[~mask] = np.nan
    logits[1, 3, 0] = np.inf
    targets = rng.integers(0, 8, size=(2, 4))
    old = np.full((2, 4), -2.0, np.float32)

    def loss_fn(z):
        logp, ent = grpo.token_logprobs_and_entropy(z, targets, mask)
        return policy_loss(logp, old, jnp.array([1.0, -1.0]), mask, entropy=ent, entropy_coef=0.01)[0]

    loss, g = jax.value_and_grad(loss_fn)(jnp.asarray(logits))
    g = np.asarray(g)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(g))
    assert np.all(g[~mask] == 0.0) and np.all(g[..., -3:] == 0.0) and np.any(g[mask] != 0.0)
    logp, ent = grpo.token_logprobs_and_entropy(logits, targets, mask)
    ref_logp, ref_ent = np_logprobs_entropy(logits[..., :-3], np.where(mask, targets, 0), mask)
    np.testing.assert_allclose(np.asarray(logp), ref_logp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ent), ref_ent, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- jit and errors


def test_jit_matches_eager_with_a_static_config():
    """The config is a static (hashable) argument of a jitted loss; the denominators may be traced."""
    d = make_batch(seed=2)
    config = grpo.LossConfig(kl_coef=0.1, entropy_coef=0.01)

    @functools.partial(jax.jit, static_argnums=1)
    def f(lp, config, num_tokens):
        return grpo.policy_loss(lp, d["old"], d["adv"], d["mask"], config, ref_logp=d["ref"], entropy=d["ent"],
                                num_tokens=num_tokens)

    n = int(d["mask"].sum())
    loss, m = f(d["lp"], config, jnp.int32(n))
    eager, m_eager = call(d, ref_logp=d["ref"], kl_coef=0.1, entropy=d["ent"], entropy_coef=0.01, num_tokens=n)
    np.testing.assert_allclose(float(loss), float(eager), rtol=1e-6)
    for k in m:
        np.testing.assert_allclose(float(m[k]), float(m_eager[k]), rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("kwargs, match", [
    (dict(agg="token-sum"), "agg must be one of"),
    (dict(agg="micro-batch-token-mean", loss_norm=512.0), "loss_norm is used by"),
    (dict(kl_estimator="k4", ref_logp=np.zeros((B, T))), "kl_estimator must be one of"),
    (dict(clip_low=1.0), "clip_low must be < 1"),
    (dict(clip_low=-0.1), "clip_low must be >= 0"),
    (dict(clip_high=float("nan")), "clip_high must be a finite"),
    (dict(clip_high=-0.2), "clip_high"),
    (dict(dual_clip=1.0), "dual_clip must be > 1"),
    (dict(dual_clip="3"), "dual_clip"),
    (dict(kl_coef=0.1), "kl_coef=0.1 needs ref_logp"),
    (dict(entropy_coef=0.001), "entropy_coef=0.001 needs entropy"),
    (dict(loss_norm=512.0), "loss_norm"),
    (dict(loss_norm=0.0, agg="seq-mean-token-sum-norm"), "loss_norm must be > 0"),
    (dict(ref_logp=np.zeros((B, T + 1))), "ref_logp must have shape"),
    (dict(entropy=np.zeros((B,))), "entropy must have shape"),
])
def test_policy_loss_bad_arguments(kwargs, match):
    """Each setting is checked once, where its `LossConfig` is built; the arrays where the loss is called."""
    d = make_batch()
    with pytest.raises(ValueError, match=match):
        call(d, **kwargs)


def test_policy_loss_takes_a_loss_config():
    d = make_batch()
    with pytest.raises(TypeError, match="config must be a LossConfig"):
        grpo.policy_loss(d["lp"], d["old"], d["adv"], d["mask"], {"agg": "token-mean"})


def test_bad_shapes_and_temperature():
    d = make_batch()
    with pytest.raises(ValueError, match="advantages must have shape"):
        policy_loss(d["lp"], d["old"], d["adv"][:-1], d["mask"])
    with pytest.raises(ValueError, match="old_logp must have shape"):
        policy_loss(d["lp"], d["old"][:, :-1], d["adv"], d["mask"])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        grpo.token_logprobs_and_entropy(np.zeros((1, 2, 3)), np.zeros((1, 2), int), np.ones((1, 2)), temperature=0.0)
    with pytest.raises(ValueError, match="logits must be"):
        grpo.token_logprobs_and_entropy(np.zeros((2, 3)), np.zeros((2,), int), np.ones((2,)))


# ------------------------------------------------------------------------ GSPO and rollout-mismatch correction


def np_gspo_loss(lp, old, adv, mask, clip_low, clip_high, agg):
    """GSPO (arXiv 2507.18071, eq. 5-7) in float64: s_i = exp(mean_t(logπ − logπ_old)) per completion, the clipped
    surrogate max(−A s_i, −A clip(s_i)) on every token of completion i, aggregated as ``agg``."""
    lp, old, mask = np.asarray(lp, np.float64), np.asarray(old, np.float64), np.asarray(mask, bool)
    pg = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        if mask[b].any():
            s = math.exp((lp[b] - old[b])[mask[b]].mean())
            pg[b, mask[b]] = max(-adv[b] * s, -adv[b] * min(max(s, 1 - clip_low), 1 + clip_high))
    return np_aggregate(pg, mask, agg)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_gspo_sequence_ratio_matches_numpy_and_its_gradient(agg):
    d = make_batch(seed=4, b=12)
    kw = dict(importance_sampling_level="sequence", agg=agg, clip_low=3e-4, clip_high=4e-4)  # GSPO's clips
    loss, m = call(d, **kw)
    np.testing.assert_allclose(float(loss), np_gspo_loss(d["lp"], d["old"], d["adv"], d["mask"], 3e-4, 4e-4, agg),
                               rtol=1e-5, atol=1e-7)
    assert 0 < m["clip_frac"] < 1  # whole sequences clipped with GSPO's tiny ranges
    # The gradient through the sequence ratio: ∂s_i/∂logπ_t = s_i / |y_i| on every token of an unclipped sequence.
    g = np.asarray(jax.grad(lambda lp: call({**d, "lp": lp}, **kw)[0])(d["lp"]), np.float64)
    with jax.enable_x64(True):
        g64 = jax.grad(lambda lp: np_free_gspo(lp, d, agg))(np.asarray(d["lp"], np.float64))
    np.testing.assert_allclose(g, np.asarray(g64), rtol=1e-4, atol=1e-8)
    # Not the token-level loss: the two differ on this batch.
    assert abs(float(call(d, agg=agg, clip_low=3e-4, clip_high=4e-4)[0]) - float(loss)) > 1e-4


def np_free_gspo(lp, d, agg):
    """GSPO written directly in jax.numpy (float64), for its gradient."""
    mask = jnp.asarray(d["mask"])
    lengths = jnp.maximum(mask.sum(1), 1)
    s = jnp.exp(jnp.where(mask, lp - d["old"], 0.0).sum(1) / lengths)
    adv = jnp.asarray(d["adv"], jnp.float64)
    pg_seq = jnp.maximum(-adv * s, -adv * jnp.clip(s, 1 - 3e-4, 1 + 4e-4))
    pg = jnp.where(mask, pg_seq[:, None], 0.0)
    if agg == "token-mean":
        return pg.sum() / mask.sum()
    nonempty = mask.any(1)
    return jnp.sum(jnp.where(nonempty, pg.sum(1) / lengths, 0.0)) / nonempty.sum()


def test_rollout_correction_weights_the_surrogate_per_token():
    """Truncated importance sampling: each token's surrogate times its (constant) weight w; KL and entropy terms
    unweighted; no gradient through w."""
    d = make_batch(seed=6)
    w = np.random.default_rng(0).uniform(0.2, 2.0, d["mask"].shape).astype(np.float32)
    kw = dict(agg="token-mean", ref_logp=d["ref"], kl_coef=0.1, entropy=d["ent"], entropy_coef=0.01)
    loss, m = call(d, rollout_weights=w, rollout_correction="token", **kw)
    lp, old, adv, mask = (np.asarray(d[k], np.float64) for k in ("lp", "old", "adv", "mask"))
    pg = np.zeros(mask.shape)
    for b, t in zip(*np.nonzero(d["mask"]), strict=True):
        pg[b, t] = w[b, t] * np_token_loss(lp[b, t], old[b, t], adv[b], 0.2, 0.2, None)[0]
    _, plain = np_policy_loss(d["lp"], d["old"], d["adv"], d["mask"], **kw)
    expect = np_aggregate(pg, d["mask"], "token-mean") + 0.1 * plain["kl"] - 0.01 * plain["entropy"]
    np.testing.assert_allclose(float(loss), expect, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(m["pg_loss"]), np_aggregate(pg, d["mask"], "token-mean"), rtol=1e-5)
    g_w = jax.grad(lambda w: call(d, rollout_weights=w, **kw)[0])(w)
    assert not np.any(np.asarray(g_w))
    with pytest.raises(ValueError, match="rollout_weights must have shape"):
        call(d, rollout_weights=w[:, :-1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(importance_sampling_level="seq"), "importance_sampling_level must be one of"),
    (dict(rollout_correction="sequence"), "rollout_correction must be one of"),
    (dict(rollout_correction_cap=0.0), "rollout_correction_cap must be > 0"),
])
def test_new_loss_options_are_checked_where_the_config_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        grpo.LossConfig(**kwargs)
