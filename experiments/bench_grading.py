"""Wall time of grading issue #27's hostile batch with the trainer's grader: one completion of 1 MB of argument-less
``\\boxedX`` (linear-time extraction finds no answer) plus ``--hangs`` answers that sympy never finishes
(``\\boxed{9^{9^{9^{9}}}}``), through ``paper_reward`` on a fresh default :class:`~sfpo_jax.rewards.MathGrader`
(workers started first, so their start-up is not timed).

    python experiments/bench_grading.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from sfpo_jax.rewards import MathGrader, paper_reward

HANG = r"\boxed{9^{9^{9^{9}}}}"


def hostile_batch(hangs: int) -> list[str]:
    return ["\\boxedX" * (1_000_000 // len("\\boxedX")), *[HANG] * hangs]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hangs", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    batch = hostile_batch(args.hangs)
    times, statuses = [], None
    for _ in range(args.repeats):
        with MathGrader() as grader:
            grader.start()
            start = time.monotonic()
            paper_reward(batch, ["1"] * len(batch), grader=grader)
            times.append(time.monotonic() - start)
            statuses = grader.last_result.metrics()
    print(json.dumps({"seconds": [round(t, 2) for t in times], "median": round(statistics.median(times), 2),
                      "workers": MathGrader().num_workers, "load": os.getloadavg(), "last_counts": statuses}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
