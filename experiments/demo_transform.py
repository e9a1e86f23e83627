"""A small, honest demonstration of SFPO as an optax transformation (CPU, well under a minute).

The task is GRPO on a toy "one-token language model": a prompt is a feature vector x ∈ R^D, the policy is a
softmax over V answers with logits x·W + b, and the reward is 1 for the answer a hidden teacher picks
(argmax x·W*), else 0. Each batch draws P prompts, samples G answers per prompt from the current policy (the slow
point), computes group-normalised advantages and the clipped surrogate with the rollout log-probs held fixed
(`sfpo_jax.rl.grpo`), and splits the batch into M mini-batches. Both runs use the same optimizer,
`optax.adamw`, the same prompts and the same sampling keys per batch:

  GRPO  optax.chain(adamw, sfpo(num_fast_steps=0, num_minibatches=M))   # M calls per batch, = plain adamw
  SFPO  optax.chain(adamw, sfpo(num_fast_steps=3, alpha=0.8, num_minibatches=M))   # 4·M calls per batch
  GRPO×4 optax.chain(adamw, sfpo(num_fast_steps=3, alpha=1.0, num_minibatches=M))  # 4 plain epochs: SFPO's
                                                                                    # compute, no reposition

and the training loop asks `calls_per_batch(opt_state)` how many calls each batch gets; the batch's mean token
entropy goes to every call as `entropy=` (the switch to GRPO). Reported: the expected reward of the policy on
held-out prompts after every batch (mean ± std over seeds), and the optimizer calls made. SFPO spends (K+1)×
the gradient computations per batch, so GRPO×4 is the control with equal compute; the plot shows both axes.

  python experiments/demo_transform.py --out runs/demo_transform
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfpo_jax.optim import calls_per_batch, sfpo, sfpo_active
from sfpo_jax.rl import grpo

D, V = 16, 8  # prompt features, answers ("vocabulary")


def init_policy(key):
    return {"w": 0.01 * jax.random.normal(key, (D, V)), "b": jnp.zeros((V,))}


def logits_fn(params, x):
    return x @ params["w"] + params["b"]


def expected_reward(params, x, answers):
    """Mean probability of the teacher's answer: the exact expected reward of the sampling policy."""
    probs = jax.nn.softmax(logits_fn(params, x), axis=-1)
    return jnp.mean(jnp.take_along_axis(probs, answers[:, None], axis=-1))


@functools.partial(jax.jit, static_argnames="group_size")
def rollout(params, key, x, answers, group_size):
    """G sampled answers per prompt at the current (slow) params: tokens [P·G, 1], old log-probs, advantages."""
    xs = jnp.repeat(x, group_size, axis=0)
    logits = logits_fn(params, xs)
    tokens = jax.random.categorical(key, logits)[:, None]
    rewards = (tokens[:, 0] == jnp.repeat(answers, group_size)).astype(jnp.float32)
    mask = jnp.ones_like(tokens, dtype=bool)
    old_logp, _ = grpo.token_logprobs_and_entropy(logits[:, None, :], tokens, mask)
    return xs, tokens, old_logp, grpo.group_advantages(rewards, group_size), rewards.mean()


def loss_fn(params, xs, tokens, old_logp, advantages):
    mask = jnp.ones_like(tokens, dtype=bool)
    logp, entropy = grpo.token_logprobs_and_entropy(logits_fn(params, xs)[:, None, :], tokens, mask)
    loss, _ = grpo.policy_loss(logp, old_logp, advantages, mask, grpo.LossConfig(entropy_coef=1e-3), entropy=entropy)
    return loss, jnp.mean(entropy)


def make_call(tx):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def call(params, opt_state, xs, tokens, old_logp, advantages):
        (_, entropy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, xs, tokens, old_logp, advantages)
        updates, opt_state = tx.update(grads, opt_state, params, entropy=entropy)
        return optax.apply_updates(params, updates), opt_state

    return call


def train(tx, seed, args, eval_x, eval_answers, teacher):
    call = make_call(tx)
    params = init_policy(jax.random.key(seed))
    opt_state = tx.init(params)
    data_key = jax.random.key(10_000 + seed)  # the same prompts and sampling keys for every optimizer
    rewards, calls, active = [float(expected_reward(params, eval_x, eval_answers))], [], []
    rows = args.prompts * args.group_size
    for step in range(args.steps):
        k_prompts, k_sample = jax.random.split(jax.random.fold_in(data_key, step))
        x = jax.random.normal(k_prompts, (args.prompts, D))
        xs, tokens, old_logp, adv, _ = rollout(params, k_sample, x, jnp.argmax(x @ teacher, -1), args.group_size)
        n = calls_per_batch(opt_state)
        active.append(sfpo_active(opt_state))
        for i in range(n):
            j = i % args.minibatches
            sl = slice(j * rows // args.minibatches, (j + 1) * rows // args.minibatches)
            params, opt_state = call(params, opt_state, xs[sl], tokens[sl], old_logp[sl], adv[sl])
        calls.append(n)
        rewards.append(float(expected_reward(params, eval_x, eval_answers)))
    return np.array(rewards), np.array(calls), np.array(active)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="batches of rollouts per run")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per batch")
    parser.add_argument("--group-size", type=int, default=8, help="sampled answers per prompt")
    parser.add_argument("--minibatches", type=int, default=2, help="M: optimizer calls per epoch")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--num-fast-steps", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.8)
    parser.add_argument("--out", type=Path, default=Path("runs/demo_transform"), help="directory for the plot")
    args = parser.parse_args()

    t0 = time.perf_counter()
    teacher = jax.random.normal(jax.random.key(12345), (D, V))
    eval_x = jax.random.normal(jax.random.key(54321), (1024, D))
    eval_answers = jnp.argmax(eval_x @ teacher, -1)
    adamw = optax.adamw(args.lr, b1=0.9, b2=0.999, weight_decay=0.01)
    runs = {
        "GRPO": optax.chain(adamw, sfpo(0, num_minibatches=args.minibatches)),
        "SFPO": optax.chain(adamw, sfpo(args.num_fast_steps, args.alpha, num_minibatches=args.minibatches)),
        # The same compute as SFPO without the reposition: α = 1 keeps θ_K, i.e. K+1 plain epochs per batch.
        f"GRPO×{args.num_fast_steps + 1}": optax.chain(
            adamw, sfpo(args.num_fast_steps, 1.0, num_minibatches=args.minibatches)
        ),
    }
    results = {}
    for name, tx in runs.items():
        per_seed = [train(tx, seed, args, eval_x, eval_answers, teacher) for seed in range(args.seeds)]
        results[name] = {
            "reward": np.stack([r for r, _, _ in per_seed]),  # [seeds, steps + 1]
            "calls": np.stack([c for _, c, _ in per_seed]),  # [seeds, steps]
            "active": np.stack([a for _, _, a in per_seed]),
        }

    print(f"Expected reward on 1024 held-out prompts (mean ± std over {args.seeds} seeds); optimizer calls so far.")
    print(f"{args.prompts} prompts × {args.group_size} answers per batch, M = {args.minibatches}, adamw lr {args.lr}; "
          f"SFPO K = {args.num_fast_steps}, α = {args.alpha}.\n")
    names = list(results)
    print("| batch | " + " | ".join(f"{n} reward (calls so far)" for n in names) + " | SFPO calls this batch |")
    print("| --- " * (len(names) + 2) + "|")
    g, s = results["GRPO"], results["SFPO"]
    for step in sorted({0, 1, 2, 5, 10, 20, 30, args.steps} & set(range(args.steps + 1))):
        cells = [
            f"{r['reward'][:, step].mean():.3f} ± {r['reward'][:, step].std():.3f} "
            f"({int(r['calls'][:, :step].sum(1).mean())})"
            for r in results.values()
        ]
        this = "–" if step == args.steps else f"{s['calls'][:, step].mean():g}"
        print(f"| {step} | " + " | ".join(cells) + f" | {this} |")
    best_g = g["reward"].mean(0).max()
    reach = np.nonzero(s["reward"].mean(0) >= best_g)[0]
    switched = (~s["active"]).any(1).sum()
    print(f"\nGRPO's best mean reward {best_g:.3f}: SFPO first reaches it after "
          + (f"{reach[0]} of {args.steps} batches" if reach.size else "— (never)")
          + f"; the entropy switch turned SFPO off in {switched} of {args.seeds} seeds.")
    control = results[f"GRPO×{args.num_fast_steps + 1}"]["reward"][:, -1]
    print(f"Final reward: SFPO {s['reward'][:, -1].mean():.3f}, GRPO×{args.num_fast_steps + 1} (same compute, no "
          f"reposition) {control.mean():.3f}, GRPO {g['reward'][:, -1].mean():.3f}. A toy shows the mechanics, "
          "not the paper's claim: try --lr.")
    print(f"SFPO and GRPO×{args.num_fast_steps + 1} make (K+1)× GRPO's gradient computations per batch: they trade "
          "optimizer compute for rollouts.")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, r in results.items():
        mean, std = r["reward"].mean(0), r["reward"].std(0)
        batches = np.arange(args.steps + 1)
        calls = np.concatenate([[0], r["calls"].mean(0).cumsum()])
        for ax, xs in zip(axes, (batches, calls), strict=True):
            ax.plot(xs, mean, label=name)
            ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
    axes[0].set_xlabel("batches of rollouts")
    axes[1].set_xlabel("optimizer calls (gradient computations)")
    for ax in axes:
        ax.set_ylabel("expected reward (held out)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"GRPO vs SFPO (K={args.num_fast_steps}, α={args.alpha}) on a toy bandit, {args.seeds} seeds, "
                 "same adamw")
    fig.tight_layout()
    path = args.out / "demo_transform.png"
    fig.savefig(path, dpi=120)
    print(f"\nWrote {path} ({time.perf_counter() - t0:.1f} s).")


if __name__ == "__main__":
    from sfpo_jax.host import configure_malloc

    configure_malloc()  # malloc keeps freed memory (SFPO_RETAIN_MEMORY=0: off); SFPO_HUGE_PAGES=1: huge pages
    main()
