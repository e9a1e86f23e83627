"""Settings of the host process that must be in place before it starts: the C library reads them at startup.

**Transparent huge pages for malloc (opt-in: `SFPO_HUGE_PAGES=1`).** XLA:CPU (and PyTorch) allocate every large
buffer with malloc, which glibc serves from fresh `mmap`s and unmaps on free, so each call of a jitted program
touches new memory one 4 KiB page at a time: one W2 GRPO step on the bench model took ~590,000 minor page faults,
~1 s of kernel time in a 2.9 s step. With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc asks the
kernel for transparent huge pages (`madvise(MADV_HUGEPAGE)`), 2 MiB at a time: the same step took ~5,000 faults and
2.2 s. The kernel only grants them to memory that asks where its THP mode is `madvise` (the common default); with
`always` every process has them already, with `never` no process can.

It is not on by default because it is not faster everywhere. Measured on the 2-core CPU VM (BENCHMARKS.md, "huge
pages"): bf16 GRPO and SFPO steps 15-25% faster, batch-1 decoding of SmolLM2 1.4x; but the float32 GRPO step ~20%
slower and SmolLM2's bf16 forward+backward ~40% slower, with no compaction stall or fallback in the kernel's
counters (cause not found). Measure your workload both ways.

The setting cannot be made from inside a running process, so `use_huge_pages` re-executes the program with it; the
experiment scripts call it first thing, and it does nothing unless `SFPO_HUGE_PAGES=1`. A notebook or a script of
your own sets `GLIBC_TUNABLES` itself (or calls `use_huge_pages()` before any work).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
ENABLE = "SFPO_HUGE_PAGES"  # "1": re-run with huge pages; anything else: leave the process as it is
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)  # the first glibc with the glibc.malloc.hugetlb tunable


def thp_mode(path: str = _THP_MODE) -> str | None:
    """The kernel's transparent-huge-page mode (`always`, `madvise` or `never`), None where it has none."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_pages_env(environ: Mapping[str, str], *, system: str | None = None,
                   libc: tuple[str, str] | None = None, mode: str | None = "unset") -> dict[str, str] | None:
    """The environment to re-run the process with so that malloc uses transparent huge pages, or None when that
    was not asked for (`SFPO_HUGE_PAGES` not "1") or would change nothing: not Linux, not glibc >= 2.35, a THP mode
    other than `madvise`, or the tunable already set. `system`, `libc` and `mode` default to this machine's."""
    if environ.get(ENABLE) != "1" or TUNABLE.split("=")[0] in environ.get("GLIBC_TUNABLES", ""):
        return None
    if (system or platform.system()) != "Linux":
        return None
    name, version = libc or platform.libc_ver()
    try:
        too_old = tuple(int(v) for v in version.split(".")[:2]) < _MIN_GLIBC
    except ValueError:
        too_old = True
    if name != "glibc" or too_old:
        return None
    if (thp_mode() if mode == "unset" else mode) != "madvise":
        return None
    tunables = ":".join(t for t in (environ.get("GLIBC_TUNABLES", ""), TUNABLE) if t)
    return {**environ, "GLIBC_TUNABLES": tunables}


def use_huge_pages() -> None:
    """Re-executes this Python program (same interpreter, options and arguments: `sys.orig_argv`) with
    `huge_pages_env`'s environment, and returns at once where that is None. Call it before any work: the process
    is replaced, and nothing it holds survives."""
    env = huge_pages_env(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
