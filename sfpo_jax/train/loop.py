"""The RL loop, readable top to bottom: setup, then per step one batch from the rollout side
(:mod:`sfpo_jax.train.rollouts`) and one call of the learner side (:mod:`sfpo_jax.train.learner`), evaluation,
checkpoints.

Determinism: the data order is a pure function of ``(seed, cursor)`` and every PRNG key of ``(seed, step)``, and a
checkpoint holds the trained params and optimizer state (SFPO's cycle and slow copy, the non-finite counters
included) with the rollout side's :class:`~sfpo_jax.train.rollouts.Position`, so a run killed at any moment and
resumed ends exactly where an uninterrupted run ends (same device count). The KL reference policy is the initial
policy, and with LoRA (``model.lora_rank``) the checkpoint holds the adapters only: both are loaded again from
``model.path`` on resume rather than checkpointed. The sampler and evaluation take
``learner.policy_params(state)`` (the merged weights with LoRA), and so does the returned model.

Multi-host (a TPU pod slice, a GPU cluster): every process runs this loop; each samples and scores its own share
of every step's prompts (:mod:`sfpo_jax.parallel.multihost`), the learner sees one global batch, and process 0
alone writes metrics.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from tqdm.auto import tqdm

from sfpo_jax.parallel import make_mesh
from sfpo_jax.train import checks
from sfpo_jax.train.config import Config
from sfpo_jax.train.evaluation import eval_sets_of, evaluate
from sfpo_jax.train.learner import TrainState, make_learner
from sfpo_jax.train.metrics import PhaseTimer
from sfpo_jax.train.policy import load_policy, task_from_config
from sfpo_jax.train.preemption import Preempted, StopFlag, on_signals
from sfpo_jax.train.rollouts import Position, TrainingPrompts, make_rollouts
from sfpo_jax.train.run_dir import RunDir


class NonFiniteError(RuntimeError):
    """Too many optimizer calls in a row had non-finite loss or gradients (the checkpoints saved so far are kept)."""


@dataclasses.dataclass
class TrainResult:
    """What a finished run leaves in memory (everything is also on disk under ``out_dir``)."""

    model: nnx.Module
    tokenizer: Any
    opt_state: Any
    history: list[dict]
    out_dir: Path


def train(cfg: Config, *, resume: bool = False, task=None) -> TrainResult:
    """Runs the configured RL training; ``resume`` continues from the last intact checkpoint in ``cfg.run.out``.

    SIGTERM / SIGINT stop it at the next step boundary after a checkpoint of that step (:class:`Preempted`)."""
    task = task if task is not None else task_from_config(cfg)
    # RunDir locks the folder and refuses one it would overwrite, or a changed config; both blocks release on exit.
    with RunDir(cfg, resume=resume, is_main=jax.process_index() == 0) as run, on_signals() as stop:
        return _train(cfg, task, run, stop)


def _train(cfg: Config, task, run: RunDir, stop: StopFlag) -> TrainResult:
    is_main = jax.process_index() == 0
    mesh = mesh_from_config(cfg)
    model, tokenizer = load_policy(cfg, task, mesh=mesh)
    r, G, e = cfg.rollout, cfg.rollout.group_size, cfg.eval

    def encode(problems):
        return [tokenizer.encode(task.render(p), add_special_tokens=False) for p in problems]

    problems = task.train_problems()
    problems, prompts, dropped = checks.prompts_within(problems, encode(problems), r.max_prompt_length)  # once
    eval_sets = eval_sets_of(task, e.max_problems) if e.every or e.before_train else {}
    eval_sets, eval_prompts, eval_dropped = checks.sets_within(eval_sets, encode, r.max_prompt_length)
    checks.check_prompts_fit({"train": prompts, **eval_prompts}, tokenizer, model.config, r.max_new_tokens)
    data_metrics = dropped_prompts(dropped, len(problems) + dropped, eval_dropped, r.max_prompt_length, is_main)
    rollouts = make_rollouts(model, tokenizer, task.reward, r, cfg.loss, mesh=mesh,
                             reward_metrics=getattr(task, "reward_metrics", None),
                             data=TrainingPrompts(prompts, [p.answer for p in problems], cfg.run.seed))
    learner, state = make_learner(model, cfg.optimizer(), r, cfg.loss, mesh=mesh, lora=cfg.lora())
    state, meta = run.restore(state)  # then writes config.yaml
    step0 = meta["step"]
    position = Position(*meta.get("rollout", (step0, step0 * r.prompts_per_step)))
    timer = PhaseTimer(("sample", "score", "logprobs", "update", "eval"))
    timer.load(meta["timer"])
    eval_chunk = min(r.prompts_per_step, (r.generation_batch_size or r.prompts_per_step) * jax.process_count())
    base_key = jax.random.key(cfg.run.seed)

    def evaluation(step: int) -> dict[str, float]:
        with timer("eval"):
            return evaluate(rollouts.sampler, learner.policy_params(state), eval_sets, encode, task.reward, tokenizer,
                            e.sampling(r.max_new_tokens, (tokenizer.eos_token_id,)), eval_chunk,
                            eval_key(base_key, step))

    if e.before_train and step0 == 0:
        run.log({"step": 0, "rollouts": 0, **evaluation(0), **timer.totals()})
    bar = tqdm(range(step0, cfg.run.steps), initial=step0, total=cfg.run.steps, desc=cfg.algo,
               disable=not (cfg.run.progress and is_main), dynamic_ncols=True)
    for step in bar:
        batch, rollout_metrics, position = rollouts.next(learner.policy_params(state), position, base_key,
                                                         timer=timer)
        state, metrics = learner(state, batch, timer=timer)
        row = {"step": step + 1, "rollouts": position.cursor * G, **rollout_metrics, **metrics,
               "lr": cfg.optim.learning_rate, **data_metrics}
        if metrics["nonfinite_in_a_row"] >= cfg.run.max_nonfinite_in_a_row:
            last = run.checkpointer.latest_step()
            kept = f"the last checkpoint, step {last}, is intact" if last else "no checkpoint was saved yet"
            raise NonFiniteError(f"step {step + 1}: {metrics['nonfinite_in_a_row']} optimizer calls in a row had "
                                 f"non-finite loss or gradients (skipped); in {run.out} {kept}")
        if e.every and ((step + 1) % e.every == 0 or step + 1 == cfg.run.steps):
            row |= evaluation(step + 1)
        run.log(row | timer.totals())
        bar.set_postfix(reward=f"{row['reward/mean']:.3f}", sfpo=metrics["sfpo_active"], refresh=False)
        signum = stop.agreed()  # SIGTERM / SIGINT on any process: every process saves this step, then stops
        if signum or (cfg.run.checkpoint_every and ((step + 1) % cfg.run.checkpoint_every == 0
                                                   or step + 1 == cfg.run.steps)):
            run.save(step + 1, state, timer.state(), rollout=list(position))
        if signum and step + 1 < cfg.run.steps:
            raise Preempted(signum, step + 1, run.out)
    bar.close()
    nnx.update(model, learner.policy_params(state))  # with LoRA: the merged weights
    return TrainResult(model=model, tokenizer=tokenizer, opt_state=state.opt_state, history=run.rows, out_dir=run.out)


def eval_key(base_key: jax.Array, step: int) -> jax.Array:
    """The key of the evaluation after ``step`` steps (step 0: before training)."""
    if step == 0:
        return jax.random.fold_in(base_key, 2**32 - 1)
    return jax.random.fold_in(jax.random.fold_in(base_key, step - 1), 1)


def dropped_prompts(train: int, num_train: int, eval_sets: dict[str, int], max_prompt_length: int,
                    say: bool) -> dict[str, int]:
    """The metrics of the prompts dropped for ``rollout.max_prompt_length`` (logged with every row), said once on
    stderr when ``say`` and any was dropped."""
    dropped_eval = sum(eval_sets.values())
    if say and (train or dropped_eval):
        per_set = ", ".join(f"{name} {n}" for name, n in eval_sets.items() if n)
        print(f"rollout.max_prompt_length={max_prompt_length} drops {train} of {num_train} training prompts"
              + (f" and evaluation prompts: {per_set}" if dropped_eval else ""), file=sys.stderr)
    return {"data/train_prompts_dropped": train, "data/eval_prompts_dropped": dropped_eval}


def mesh_from_config(cfg: Config):
    """The run's mesh; with no ``-1`` axis and fewer devices than the machine has, the first ones are used."""
    m, devices = cfg.mesh, jax.devices()
    size = m.data * m.fsdp * m.tensor
    if -1 not in (m.data, m.fsdp, m.tensor) and 0 < size < len(devices):
        devices = devices[:size]
    return make_mesh(m.data, m.fsdp, m.tensor, devices=devices)


__all__ = ["NonFiniteError", "Preempted", "TrainResult", "TrainState", "mesh_from_config", "train"]
