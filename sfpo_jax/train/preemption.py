"""Graceful stops: SIGTERM (what a cloud or TPU preemption sends before it kills) and SIGINT (Ctrl-C) become a
flag that the training loop reads at each step boundary, where it saves a checkpoint and stops with
:class:`Preempted`, so that ``--resume`` continues exactly.

A step is never cut in half: the signal only sets the flag. A second signal of the same kind restores the default
behaviour first, so pressing Ctrl-C twice (or a second SIGTERM) stops at once, as without this module.

Multi-host: a preemption may reach one host only, and every process must save collectively (orbax) and stop at the
same step, so :meth:`StopFlag.agreed` all-gathers the processes' flags at the boundary (one tiny collective per
step) and all of them stop when any one was signalled.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from sfpo_jax.parallel import all_hosts

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped at a step boundary on a signal, after saving a checkpoint of that step."""

    def __init__(self, signum: int, step: int, out: Path):
        self.signum, self.step, self.out = signum, step, out
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}: checkpoint saved in {out}; "
                         "run the same command with --resume to continue")


class StopFlag:
    """Which signal (if any) asked this process to stop; set by the handlers of :func:`on_signals`."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def agreed(self) -> int | None:
        """The signal that stops the run at this step boundary, the same on every process (None: go on).
        Collective on several processes: every process must call it at the same step."""
        local = self.signum or 0
        if jax.process_count() > 1:
            flags = all_hosts(np.asarray([local], np.int32))
            local = int(next((f for f in flags if f), 0))
        return local or None


@contextlib.contextmanager
def on_signals(signals: tuple[int, ...] = SIGNALS) -> Iterator[StopFlag]:
    """Within the block, the first of ``signals`` sets the yielded flag (and says so on stderr) instead of
    stopping the process; the second restores the previous handler and re-raises the signal. The previous
    handlers are back on exit. Outside the main thread (where Python cannot install handlers) the flag simply
    never sets."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum, frame):
        if flag.signum is not None:  # the second one: stop now, as the default handler would
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
            return
        flag.signum = signum
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint at the end of this step, then "
              "stopping (send it again to stop at once)", file=sys.stderr, flush=True)

    for s in signals:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
