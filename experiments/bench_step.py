"""W2 — one GRPO step, end to end (../shared/bench/README.md): seconds per training step of our trainer's pieces
against TRL's `GRPOTrainer`, in the same run, on the same weights and the same workload.

Workload: 2 prompts × 8 completions; prompts are 64 random token ids; 128 new tokens at temperature 1 with no
top-k/top-p and no early stop; rewards from a cheap Python function of the completion text (the fraction of even
token numbers); one AdamW step (lr 1e-6, weight decay 0.01, grad-norm clip 1.0) on the whole batch of 16; no KL.

Ours is the step function `sfpo_jax.train.loop.train` itself calls, `make_rl_step`, from a `Config` built with
`load_config(None, overrides)`: `Sampler.generate` at the current params → rewards on `Rollout.texts` →
`grpo.group_advantages` → the learner batch on its sharding → `calls_per_batch(opt_state)` jitted update calls
(params and optimizer state donated), each followed by the host read of its metrics. GRPO makes one optimizer call
per step; SFPO (K = 3, alpha 0.8) makes K+1 = 4 on the same batch.

The peer is TRL's `GRPOTrainer` (optional, not a dependency of this project: `pip install trl==1.16.0`; skipped
with a note when absent) with `num_generations=8`, `per_device_train_batch_size=16`, `max_completion_length=128`,
`min_new_tokens=128` (no early stop), `beta=0`, one optimizer step per generation batch, no gradient checkpointing
(TRL's default; it only slows it down here), timed between consecutive `on_step_end` callbacks. Every side runs in
every one of `--dtypes`: ours float32 masters computing in it (`model.compute_dtype`), TRL float32 or `bf16=True`
(float32 weights, bfloat16 autocast), and the headline ratio takes each side at its fastest. Both sides use one
word-level tokenizer (`t<id>` words), so a prompt string encodes to exactly its 64 ids and both reward functions
read the same texts.

The bench model (Qwen2 architecture, every matrix ~ N(0, 0.05²), hidden 512, inter 1408, 8 layers, 8 heads, 2 kv
heads, vocab 32000, tied, float32) is written once with PyTorch transformers into `--model-dir`. Figure: median
seconds per step over `--steps` timed steps after one untimed first step (compilation, allocator warm-up), per
phase as well for ours; ours runs before and after the peer, and the report gives both blocks and their union.

    python experiments/bench_step.py --steps 5 [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import dataclasses
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
    """One step of our trainer: `sfpo_jax.train.make_rl_step`, the step function `train()` itself calls, with its
    phases timed by its own `PhaseTimer`."""

    def __init__(self, path: Path, algo: str, tokenizer, model=None, compute_dtype: str = "float32"):
        import jax
        import jax.numpy as jnp

        from sfpo_jax.models import from_pretrained
        from sfpo_jax.train import PhaseTimer, load_config, make_rl_step
        from sfpo_jax.train.loop import mesh_from_config

        cfg = load_config(None, [
            f"algo={algo}", f"model.path={path}", "model.param_dtype=float32", f"model.compute_dtype={compute_dtype}",
            f"rollout.prompts_per_step={PROMPTS}", f"rollout.group_size={GROUP}",
            f"rollout.max_prompt_length={PROMPT_LEN}", f"rollout.max_new_tokens={NEW_TOKENS}",
            "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.top_k=0", "rollout.num_minibatches=1",
            "loss.kl_coef=0.0", "sfpo.num_fast_steps=3", "sfpo.alpha=0.8", "run.seed=0",
        ])
        mesh = mesh_from_config(cfg)
        self.model = model if model is not None else from_pretrained(
            path, dtype=jnp.float32, compute_dtype=jnp.dtype(compute_dtype), mesh=mesh)
        reward = lambda texts, answers: np.asarray([even_fraction(t) for t in texts], np.float32)
        # The update donates its state: each algorithm gets a private copy of the shared model's params.
        self.rl_step, state = make_rl_step(self.model, tokenizer, reward, cfg.optimizer(), cfg.rollout, cfg.loss,
                                           mesh=mesh)
        self.state = jax.tree.map(jnp.copy, state)
        rollouts = self.rl_step.rollouts
        rollouts = dataclasses.replace(rollouts, sampling=dataclasses.replace(rollouts.sampling, eos_token_ids=()))
        self.rl_step = dataclasses.replace(self.rl_step, rollouts=rollouts)
        self.base_key, self.num_steps, self.timer = jax.random.key(cfg.run.seed), 0, PhaseTimer()

    def __call__(self, prompts: list[list[int]]) -> dict[str, float]:
        import jax

        t0, c0 = time.perf_counter(), time.process_time()
        key = jax.random.fold_in(self.base_key, self.num_steps)
        self.state, m = self.rl_step(self.state, prompts, [""] * len(prompts), key, timer=self.timer)
        t1 = time.perf_counter()
        self.num_steps += 1
        assert m["response_length/mean"] == NEW_TOKENS, "no early stop: every completion has max_new_tokens tokens"
        assert np.isfinite(m["train/loss"])
        phases = {p: self.timer.last(p) for p in ("sample", "score", "update")}
        return dict(step=t1 - t0, cpu=time.process_time() - c0, **phases, calls=m["optimizer_calls"])


def bench_ours(steps: dict[str, OursStep], num_steps: int, seed: int) -> dict[str, list[dict]]:
    """`num_steps` steps of each algorithm, interleaved step by step, on fresh random prompts."""
    out = {name: [] for name in steps}
    for i in range(num_steps):
        prompts = random_prompts(PROMPTS, seed + i)
        for name, step in steps.items():
            out[name].append(step(prompts))
    return out


# ------------------------------------------------------------------------------------------------------------- TRL


def bench_trl(path: Path, tokenizer, num_steps: int, seed: int, dtype: str = "float32") -> dict:
    """`num_steps` GRPOTrainer steps; wall and process CPU seconds between consecutive `on_step_end` (the first
    from `on_train_begin`). `dtype="bfloat16"`: TRL's `bf16=True` (float32 weights, bfloat16 autocast)."""
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
            bf16=dtype == "bfloat16", gradient_checkpointing=False, seed=seed, max_steps=num_steps,
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
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="compute dtypes, each side in each (ours: float32 masters; TRL: bf16 autocast)")
    parser.add_argument("--model-dir", type=Path,
                        default=Path(os.environ.get("SFPO_BENCH_DIR", tempfile.gettempdir())) / "sfpo_bench_qwen2")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw timings here")
    args = parser.parse_args()

    import jax

    path = make_checkpoint(args.model_dir)
    tokenizer = make_tokenizer()
    load_before = os.getloadavg()[0]
    dtypes = args.dtypes.split(",")
    steps = {}
    for dtype in dtypes:
        grpo = OursStep(path, "grpo", tokenizer, compute_dtype=dtype)
        steps[f"grpo {dtype}"] = grpo
        steps[f"sfpo {dtype}"] = OursStep(path, "sfpo", tokenizer, model=grpo.model, compute_dtype=dtype)
    bench_ours(steps, 1, seed=10_000)  # the untimed first step: compilation
    before = bench_ours(steps, args.steps, seed=0)
    trl_results = {}
    if not args.no_peer:
        for dtype in dtypes:
            try:
                trl_results[dtype] = bench_trl(path, tokenizer, args.steps + 1, seed=0, dtype=dtype)
            except ImportError as e:
                trl_results = dict(skipped=f"not importable: {e}")
                break
    ran_trl = trl_results and "skipped" not in trl_results
    after = bench_ours(steps, args.steps, seed=1_000) if ran_trl else {}

    print(f"W2: {PROMPTS} prompts × {GROUP} completions, {PROMPT_LEN}-token random prompts, {NEW_TOKENS} new tokens "
          f"(no early stop), one AdamW step per optimizer call, no KL; {platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__}; load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
          f"median s/step over {args.steps} timed steps after one untimed step; ours: float32 masters computing "
          f"in the named dtype")
    med, cpu = {}, {}
    for name in steps:
        rows = before[name] + after.get(name, [])
        med[name] = statistics.median(r["step"] for r in rows)
        cpu[name] = statistics.median(r["cpu"] for r in rows)
        phases = ", ".join(f"{k} {statistics.median(r[k] for r in rows):.2f}" for k in ("sample", "score", "update"))
        blocks = " / ".join(f"{statistics.median(r['step'] for r in b[name]):.2f}" for b in (before, after) if b)
        print(f"  ours {name:14s} {med[name]:6.2f} s/step, {cpu[name]:6.2f} CPU s/step ({rows[0]['calls']} optimizer "
              f"calls; wall phases: {phases}; blocks before / after the peer: {blocks}; steps "
              f"{', '.join(f'{x:.1f}' for x in (r['step'] for r in rows))})")
    if ran_trl:
        trl_med = {}
        for dtype, result in trl_results.items():
            t, c = result["times"][1:], result["cpu"][1:]
            trl_med[dtype] = statistics.median(t)
            print(f"  TRL {result['version']} GRPOTrainer {dtype:8s} {trl_med[dtype]:6.2f} s/step, "
                  f"{statistics.median(c):6.2f} CPU s/step (torch threads {result['threads']}; steps "
                  f"{', '.join(f'{x:.1f}' for x in t)}; mean completion length {result['mean_completion_length']})")
        trl_best = min(trl_med, key=trl_med.get)
        for algo in ("grpo", "sfpo"):
            ours_best = min((n for n in steps if n.startswith(algo)), key=med.get)
            print(f"  TRL at its best ({trl_best}) / ours {algo} at its best ({ours_best}): "
                  f"{trl_med[trl_best] / med[ours_best]:.2f}× wall")
    elif trl_results:
        print(f"  TRL skipped ({trl_results['skipped']})")
    if args.json:
        args.json.write_text(json.dumps(dict(before=before, after=after, trl=trl_results), default=float))


if __name__ == "__main__":
    from sfpo_jax.host import configure_malloc

    configure_malloc()  # malloc keeps freed memory (SFPO_RETAIN_MEMORY=0: off); SFPO_HUGE_PAGES=1: huge pages
    main()
