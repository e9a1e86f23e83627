"""Settings of the host process's C library (glibc's malloc), which XLA:CPU's speed depends on.

XLA:CPU (and PyTorch) allocate every large buffer with malloc. An XLA program's temporaries are one buffer per call
(2.2 GB for one W2 update call of the bench model), and glibc serves a buffer that large from a fresh `mmap` and
unmaps it when it is freed. So every call touches new memory, one 4 KiB page fault at a time: ~570,000 minor faults
and ~0.8 s of kernel time in a 1.6 s update call. Two remedies, each measured on the 2-core CPU VM (BENCHMARKS.md,
"malloc"):

**Keep freed memory (`retain_freed_memory`; on in the experiment scripts, `SFPO_RETAIN_MEMORY=0` turns it off).**
malloc keeps what the process frees for its next allocations instead of returning it to the kernel, so a program's
second call reuses its first call's pages: almost no faults after the first call, and a W2 update call took 1.2 s
instead of 1.6 s. It is set with `mallopt` from inside the running process, before JAX starts its threads. The
cost: the process never gives memory back, and fragmentation can leave it holding more than its peak needs.

**Transparent huge pages for malloc (opt-in: `SFPO_HUGE_PAGES=1`).** With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
(glibc >= 2.35) malloc asks the kernel for transparent huge pages (`madvise(MADV_HUGEPAGE)`), 2 MiB at a time, so
the same faults are 512 times fewer. The kernel only grants them to memory that asks where its THP mode is `madvise`
(the common default); with `always` every process has them already, with `never` no process can. It is not on by
default because it is not faster everywhere (the float32 GRPO step ~20% slower, SmolLM2's bf16 forward+backward ~40%
slower; cause not found), and the first call after other work still paid ~2 s of kernel time. The setting cannot be
made from inside a running process, so `use_huge_pages` re-executes the program with it.

The experiment scripts call `configure_malloc()` first thing. A notebook or a script of your own calls
`retain_freed_memory()` before any JAX work (and sets `GLIBC_TUNABLES` itself for huge pages).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import warnings
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
ENABLE = "SFPO_HUGE_PAGES"  # "1": re-run with huge pages; anything else: leave the process as it is
RETAIN = "SFPO_RETAIN_MEMORY"  # "0": configure_malloc leaves malloc returning freed memory to the kernel
# mallopt's parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
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
    version = glibc_version(system=system, libc=libc)
    if version is None or version < _MIN_GLIBC:
        return None
    if (thp_mode() if mode == "unset" else mode) != "madvise":
        return None
    tunables = ":".join(t for t in (environ.get("GLIBC_TUNABLES", ""), TUNABLE) if t)
    return {**environ, "GLIBC_TUNABLES": tunables}


def glibc_version(*, system: str | None = None, libc: tuple[str, str] | None = None) -> tuple[int, ...] | None:
    """(major, minor) of this machine's glibc, or None: not Linux, not glibc (musl: `platform.libc_ver()` knows no
    version), or no readable version. `system` and `libc` default to this machine's."""
    if (system or platform.system()) != "Linux":
        return None
    name, version = libc or platform.libc_ver()
    if name != "glibc":
        return None
    try:
        return tuple(int(v) for v in version.split(".")[:2])
    except ValueError:
        return None


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


def retain_freed_memory() -> bool:
    """Makes glibc's malloc keep the memory this process frees for its next allocations, instead of returning it to
    the kernel, so that a jitted program's temporaries are faulted in once rather than on every call. Returns
    whether it did: False, and nothing changed, where the C library is not glibc.

    Three `mallopt` settings, each needed (glibc's `malloc(3)`, `mallopt(3)`):
    - `M_ARENA_MAX = 1`: every thread allocates from the main arena. A thread's own arena cannot hold a chunk larger
      than 64 MiB and serves it from an `mmap`, whatever the settings below say.
    - `M_MMAP_MAX = 0`: the main arena serves large chunks from its heap (`brk`) instead of a fresh `mmap` each.
    - `M_TRIM_THRESHOLD = -1`: it never gives the top of its heap back.

    Costs: the process's resident memory stays at its high-water mark (freed memory is reused, not returned), and
    all threads share one arena's lock (on the 2-core VM no slowdown was measured; many-core hosts are not).

    Call it before JAX's first computation: a thread that has already allocated keeps its own arena. Called after,
    it warns and still applies to the threads that allocate for the first time from then on.
    """
    if glibc_version() is None:
        return False
    if _jax_started():
        warnings.warn("retain_freed_memory() after JAX started: the threads that have already allocated keep "
                      "their own malloc arenas, which still return large buffers to the kernel. Call it before "
                      "the first JAX computation.", stacklevel=2)
    mallopt = ctypes.CDLL(None).mallopt
    for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)):
        if mallopt(param, value) != 1:
            raise OSError(f"mallopt({param}, {value}) failed")
    return True


def _jax_started() -> bool:
    """Whether JAX has created its backends (and so its threads). JAX is not imported here if the program has not
    imported it. The answer comes from a private JAX function: where that is gone, False."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False


def configure_malloc(environ: Mapping[str, str] = os.environ) -> None:
    """What an experiment script calls first thing: `use_huge_pages()` (which re-runs the program where
    `SFPO_HUGE_PAGES=1`), then `retain_freed_memory()` unless `SFPO_RETAIN_MEMORY=0`."""
    use_huge_pages()
    if environ.get(RETAIN, "1") != "0":
        retain_freed_memory()
