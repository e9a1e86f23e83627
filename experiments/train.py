"""Train a policy with GRPO or SFPO.

    python experiments/train.py --config experiments/configs/arith-tiny.yaml --algo sfpo --seed 0 \
        --steps 40 --out runs/sfpo-0 [--resume] [--task module.path:factory] [section.field=value ...]

``--task my_task:make`` imports ``my_task`` (from the current directory too) and runs its code: it sets
``task.import_factory``. A config file may set that field as well, and is then code to be trusted as such.

Writes ``OUT/metrics.jsonl``, ``OUT/config.yaml`` and ``OUT/checkpoints/``; ``--export DIR`` also writes the
final policy as a Hugging Face checkpoint folder. On a TPU pod or GPU cluster, run the same command on every
host: JAX's distributed runtime is initialised from the environment.

SIGTERM (a preemption) or Ctrl-C saves a checkpoint at the end of the current step and exits (143 / 130);
``--resume`` continues exactly. An error you can fix (config, run folder, reward, setup, disk) prints one line
and exits 2; ``SFPO_TRACEBACK=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys

from sfpo_jax.train.config import load_config


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: the built-in defaults)")
    p.add_argument("--algo", choices=["grpo", "sfpo", "grpo-epochs"])
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--out", help="run directory (default: the config's run.out, + '-<algo>' when --algo is given)")
    p.add_argument("--task", help="import a Task factory module.path:factory (runs that code)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT")
    p.add_argument("--export", help="write the final policy as a Hugging Face checkpoint folder here")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. sfpo.alpha=0.5")
    args = p.parse_args(argv)
    flags = {"algo": args.algo, "run.seed": args.seed, "run.steps": args.steps, "run.out": args.out,
             "task.import_factory": args.task}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    return args, overrides


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    if args.algo and args.out is None and not any(o.startswith("run.out=") for o in overrides):
        # One config file serves both algorithms: each gets its own folder, `<run.out>-<algo>`.
        cfg = load_config(args.config, [*overrides, f"run.out={cfg.run.out}-{args.algo}"])
    from sfpo_jax.parallel import initialize_distributed
    from sfpo_jax.train import train

    initialize_distributed()
    result = train(cfg, resume=args.resume)
    if args.export:
        from sfpo_jax.models import save_pretrained

        save_pretrained(result.model, args.export)
        result.tokenizer.save_pretrained(args.export)
    return 0


if __name__ == "__main__":
    from sfpo_jax.host import configure_malloc
    from sfpo_jax.train.cli import run_main

    configure_malloc()  # malloc keeps freed memory (SFPO_RETAIN_MEMORY=0: off); SFPO_HUGE_PAGES=1: huge pages
    # A user-fixable error: one line and exit 2 (SFPO_TRACEBACK=1: the traceback); SIGTERM / Ctrl-C: a checkpoint
    # at the end of the step, then exit 128 + signal.
    sys.exit(run_main(main))
