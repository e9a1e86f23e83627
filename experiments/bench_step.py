"""W2 — one GRPO step, end to end (../shared/bench/README.md): seconds per training step of our trainer's pieces
against TRL's `GRPOTrainer`, in the same run, on the same weights and the same workload.

Workload: 2 prompts × 8 completions; prompts are 64 random token ids; 128 new tokens at temperature 1 with no
top-k/top-p and no early stop; rewards from a cheap Python function of the completion text (the fraction of even
token numbers); one AdamW step (lr 1e-6, weight decay 0.01, grad-norm clip 1.0) on the whole batch of 16; no KL.

Ours is driven exactly as `sfpo_jax.train.loop.train` drives it, from a `Config` built with
`load_config(None, overrides)`: `Sampler.generate` at the current params → rewards on `Rollout.texts` →
`grpo.group_advantages` → `make_batch` + `device_put` on the batch sharding → `calls_per_batch(opt_state)` jitted
`make_update_fn` calls (params and optimizer state donated), each followed by the host read of its metrics the loop
does. GRPO makes one optimizer call per step; SFPO (K = 3, alpha 0.8) makes K+1 = 4 on the same batch.

The peer is TRL's `GRPOTrainer` (optional, not a dependency of this project: `pip install trl==1.16.0`; skipped
with a note when absent) with `num_generations=8`, `per_device_train_batch_size=16`, `max_completion_length=128`,
`min_new_tokens=128` (no early stop), `beta=0`, one optimizer step per generation batch, float32 and no gradient
checkpointing (TRL's defaults are bf16 autocast and gradient checkpointing; both would only slow it down on this
CPU), timed between consecutive `on_step_end` callbacks. Both sides use one word-level tokenizer (`t<id>` words),
so a prompt string encodes to exactly its 64 ids and both reward functions read the same texts.

The bench model (Qwen2 architecture, every matrix ~ N(0, 0.05²), hidden 512, inter 1408, 8 layers, 8 heads, 2 kv
heads, vocab 32000, tied, float32) is written once with PyTorch transformers into `--model-dir`. Figure: median
seconds per step over `--steps` timed steps after one untimed first step (compilation, allocator warm-up), per
phase as well for ours; ours runs before and after the peer, and the report gives both blocks and their union.

    python experiments/bench_step.py --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_sampler import ARCH, make_checkpoint  # the one bench model, shared by the benchmarks

PROMPTS, GROUP, PROMPT_LEN, NEW_TOKENS = 2, 8, 64, 128
PAD_ID, EOS_ID = 0, 1  # EOS exists for TRL's sake; neither side can stop early


def make_tokenizer():
    """A word-level tokenizer over the bench vocabulary: id 0 `<|pad|>`, id 1 `<|eos|>`, id i ≥ 2 the word `t<i>`.
    Decoding joins the words with spaces (no decoder set), so encoding a decoded id list gives the ids back exactly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|pad|>": PAD_ID, "<|eos|>": EOS_ID} | {f"t{i}": i for i in range(2, ARCH["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>")


def even_fraction(text: str) -> float:
    """The cheap reward: the fraction of words `t<n>` of a completion with an even n."""
    words = text.split()
    return sum(int(w[1:]) % 2 == 0 for w in words) / max(len(words), 1)


def random_prompts(num: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(2, ARCH["vocab_size"], (num, PROMPT_LEN)).tolist()


# ------------------------------------------------------------------------------------------------------------ ours


class OursStep:
    """One trainer step of `sfpo_jax.train.loop.train`, with its phases timed (the loop's own split)."""

    def __init__(self, path: Path, algo: str, tokenizer, model=None):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from sfpo_jax.models import from_pretrained
        from sfpo_jax.parallel import logical_sharding
        from sfpo_jax.sampling import Sampler, SamplingConfig
        from sfpo_jax.train import step as learner
        from sfpo_jax.train.config import load_config
        from sfpo_jax.train.loop import mesh_from_config

        self.cfg = cfg = load_config(None, [
            f"algo={algo}", f"model.path={path}", "model.dtype=float32",
            f"rollout.prompts_per_step={PROMPTS}", f"rollout.group_size={GROUP}",
            f"rollout.max_prompt_length={PROMPT_LEN}", f"rollout.max_new_tokens={NEW_TOKENS}",
            "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.top_k=0", "rollout.num_minibatches=1",
            "loss.kl_coef=0.0", "sfpo.num_fast_steps=3", "sfpo.alpha=0.8", "run.seed=0",
        ])
        mesh = mesh_from_config(cfg)
        self.model = model if model is not None else from_pretrained(path, dtype=jnp.float32, mesh=mesh)
        graphdef, params = nnx.split(self.model)
        self.params = jax.tree.map(jnp.copy, params)  # the update donates its params: one private copy per algo
        self.tx = learner.make_optimizer(cfg)
        self.opt_state = self.tx.init(self.params)
        self.sampler = Sampler(self.model, mesh=mesh, pad_token_id=tokenizer.pad_token_id)
        r = cfg.rollout
        self.rollout_cfg = SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k,
                                          top_p=r.top_p, eos_token_ids=(), num_samples=r.group_size)
        num_micro = learner.micro_batches_per_minibatch(r.prompts_per_step * r.group_size // r.num_minibatches,
                                                        r.micro_batch_size)
        self.update = learner.make_update_fn(graphdef, self.tx, cfg, num_micro)
        self.batch_sharding = logical_sharding(mesh, ("batch",))
        self.base_key = jax.random.key(cfg.run.seed)
        self.tokenizer, self.num_steps = tokenizer, 0

    def __call__(self, prompts: list[list[int]]) -> dict[str, float]:
        import jax

        from sfpo_jax.optim import calls_per_batch
        from sfpo_jax.rl import grpo
        from sfpo_jax.train import step as learner

        cfg, G, M = self.cfg, self.cfg.rollout.group_size, self.cfg.rollout.num_minibatches
        t0, c0 = time.perf_counter(), time.process_time()
        key = jax.random.fold_in(self.base_key, self.num_steps)
        rollout = self.sampler.generate(prompts, self.rollout_cfg, key, params=self.params)
        assert rollout.mask.all(), "no early stop: every completion has max_new_tokens tokens"
        t1 = time.perf_counter()
        rewards = np.asarray([even_fraction(t) for t in rollout.texts(self.tokenizer)], np.float32)
        advantages = np.asarray(grpo.group_advantages(rewards, G, scale_by_std=cfg.loss.scale_adv_by_std))
        batch = jax.device_put(learner.make_batch(rollout, advantages), self.batch_sharding)
        t2 = time.perf_counter()
        minibatches = learner.split_minibatches(batch, M)
        calls = calls_per_batch(self.opt_state)
        for call in range(calls):
            self.params, self.opt_state, m = self.update(self.params, self.opt_state, minibatches[call % M])
            m = jax.device_get(m)  # the loop reads every call's metrics (non-finite check) before the next
        t3 = time.perf_counter()
        self.num_steps += 1
        assert np.isfinite(m["loss"])
        return dict(step=t3 - t0, cpu=time.process_time() - c0, sample=t1 - t0, score=t2 - t1, update=t3 - t2,
                    calls=calls)


def bench_ours(steps: dict[str, OursStep], num_steps: int, seed: int) -> dict[str, list[dict]]:
    """`num_steps` steps of each algorithm, interleaved step by step, on fresh random prompts."""
    out = {name: [] for name in steps}
    for i in range(num_steps):
        prompts = random_prompts(PROMPTS, seed + i)
        for name, step in steps.items():
            out[name].append(step(prompts))
    return out


# ------------------------------------------------------------------------------------------------------------- TRL


def bench_trl(path: Path, tokenizer, num_steps: int, seed: int) -> dict:
    """`num_steps` GRPOTrainer steps; wall and process CPU seconds between consecutive `on_step_end` (the first
    from `on_train_begin`)."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), time.process_time()))

    def reward(prompts, completions, **kwargs):
        return [even_fraction(c) for c in completions]

    prompts = [" ".join(f"t{i}" for i in p) for p in random_prompts(PROMPTS * num_steps, seed)]
    assert tokenizer(prompts[0])["input_ids"] == random_prompts(1, seed)[0]  # one token per id, no specials
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        args = trl.GRPOConfig(
            output_dir=out, report_to="none", save_strategy="no", logging_steps=10 * num_steps, use_cpu=True,
            bf16=False, gradient_checkpointing=False, seed=seed, max_steps=num_steps,
            per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP, gradient_accumulation_steps=1,
            steps_per_generation=1, num_iterations=1, beta=0.0, max_completion_length=NEW_TOKENS,
            temperature=1.0, top_p=1.0, top_k=0, generation_kwargs={"min_new_tokens": NEW_TOKENS},
            learning_rate=1e-6, weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="constant",
            dataloader_num_workers=0,
        )
        timer = StepTimes()
        trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
                                  train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[timer])
        trainer.train()
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    marks = np.asarray(timer.marks)
    return dict(times=np.diff(marks[:, 0]).tolist(), cpu=np.diff(marks[:, 1]).tolist(), version=trl.__version__,
                threads=torch.get_num_threads(),
                mean_completion_length=lengths)


# ------------------------------------------------------------------------------------------------------------ main


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side, after one untimed first step")
    parser.add_argument("--no-peer", action="store_true", help="skip TRL")
    parser.add_argument("--model-dir", type=Path,
                        default=Path(os.environ.get("SFPO_BENCH_DIR", tempfile.gettempdir())) / "sfpo_bench_qwen2")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw timings here")
    args = parser.parse_args()

    import jax

    path = make_checkpoint(args.model_dir)
    tokenizer = make_tokenizer()
    load_before = os.getloadavg()[0]
    grpo = OursStep(path, "grpo", tokenizer)
    steps = {"grpo": grpo, "sfpo": OursStep(path, "sfpo", tokenizer, model=grpo.model)}
    bench_ours(steps, 1, seed=10_000)  # the untimed first step: compilation
    before = bench_ours(steps, args.steps, seed=0)
    trl_result = None
    if not args.no_peer:
        try:
            trl_result = bench_trl(path, tokenizer, args.steps + 1, seed=0)
        except ImportError as e:
            trl_result = dict(skipped=f"not importable: {e}")
    after = bench_ours(steps, args.steps, seed=1_000) if trl_result and "times" in trl_result else {}

    print(f"W2: {PROMPTS} prompts × {GROUP} completions, {PROMPT_LEN}-token random prompts, {NEW_TOKENS} new tokens "
          f"(no early stop), one AdamW step per optimizer call, no KL; {platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__}; load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
          f"median s/step over {args.steps} timed steps after one untimed step")
    med, cpu = {}, {}
    for name in steps:
        rows = before[name] + after.get(name, [])
        med[name] = statistics.median(r["step"] for r in rows)
        cpu[name] = statistics.median(r["cpu"] for r in rows)
        phases = ", ".join(f"{k} {statistics.median(r[k] for r in rows):.2f}" for k in ("sample", "score", "update"))
        blocks = " / ".join(f"{statistics.median(r['step'] for r in b[name]):.2f}" for b in (before, after) if b)
        print(f"  ours {name:5s} {med[name]:6.2f} s/step, {cpu[name]:6.2f} CPU s/step ({rows[0]['calls']} optimizer "
              f"calls; wall phases: {phases}; blocks before / after the peer: {blocks}; steps "
              f"{', '.join(f'{x:.1f}' for x in (r['step'] for r in rows))})")
    if trl_result is not None and "times" in trl_result:
        t, c = trl_result["times"][1:], trl_result["cpu"][1:]
        trl_med, trl_cpu = statistics.median(t), statistics.median(c)
        print(f"  TRL {trl_result['version']} GRPOTrainer {trl_med:6.2f} s/step, {trl_cpu:6.2f} CPU s/step "
              f"(torch threads {trl_result['threads']}; steps {', '.join(f'{x:.1f}' for x in t)}; mean completion "
              f"length {trl_result['mean_completion_length']})")
        for name in steps:
            print(f"  TRL / ours {name}: {trl_med / med[name]:.2f}× wall, {trl_cpu / cpu[name]:.2f}× CPU")
    elif trl_result is not None:
        print(f"  TRL skipped ({trl_result['skipped']})")
    if args.json:
        args.json.write_text(json.dumps(dict(before=before, after=after, trl=trl_result), default=float))


if __name__ == "__main__":
    main()
