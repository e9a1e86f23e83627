"""How the command-line scripts (``experiments/train.py`` and its siblings) end on an error the user can fix: one
line on stderr and exit status 2, the traceback only on request (``SFPO_TRACEBACK=1``); and on a requested stop
(:class:`~sfpo_jax.train.preemption.Preempted`), its message and the signal's conventional status 128 + signum;
on an immediate Ctrl-C (pressed twice), one line and 130.

Errors of the library's own checks (a bad config, a run folder that cannot be resumed, a reward function's output,
a setup check, a missing file, a full disk) are the user's to fix, and their message says how: a traceback
would only bury it. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections.abc import Callable

from sfpo_jax.train.checks import RewardError
from sfpo_jax.train.config import ConfigError
from sfpo_jax.train.loop import NonFiniteError
from sfpo_jax.train.preemption import Preempted
from sfpo_jax.train.rollouts import ShortBatchError
from sfpo_jax.train.run_dir import ResumeError

TRACEBACK_ENV = "SFPO_TRACEBACK"
USER_ERRORS = (ConfigError, ResumeError, RewardError, NonFiniteError, ShortBatchError, ValueError, OSError)
_DISK_FULL = "No space left on device"


def error_line(e: BaseException) -> str:
    """The one line printed for ``e``: its first line of text, with the disk-full case said plainly (orbax and
    TensorStore wrap ``ENOSPC`` in long messages of their own)."""
    text = str(e)
    if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or _DISK_FULL in text:
        what = e.strerror if isinstance(e, OSError) and e.strerror else _DISK_FULL
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return (f"the disk is full: {what}{where}; free space and run again with --resume (the checkpoints already "
                "saved are intact)")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first if isinstance(e, ConfigError | ResumeError | RewardError) else f"{type(e).__name__}: {first}"


def run_main(main: Callable[[], int]) -> int:
    """``main()``'s exit status; 2 with one line on stderr for a user-fixable error (re-raised instead when
    ``SFPO_TRACEBACK=1``), 128 + signum after a graceful stop on a signal."""
    try:
        return main()
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # Ctrl-C pressed twice, or before the loop had the handlers
        print("interrupted: the current step was not saved (--resume continues from the last checkpoint)",
              file=sys.stderr)
        return 128 + signal.SIGINT
    except USER_ERRORS as e:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(f"error: {error_line(e)}  [{TRACEBACK_ENV}=1 shows the traceback]", file=sys.stderr)
        return 2
