"""sfpo_jax.host: when the process is re-run with transparent huge pages for malloc, and that it then gets them."""

import os
import subprocess
import sys

import pytest

from sfpo_jax import host

LINUX = dict(system="Linux", libc=("glibc", "2.36"), mode="madvise")


def test_huge_pages_env_adds_the_tunable_only_where_it_changes_something():
    on = {host.ENABLE: "1"}
    env = host.huge_pages_env({"PATH": "/bin", **on}, **LINUX)
    assert env == {"PATH": "/bin", **on, "GLIBC_TUNABLES": host.TUNABLE}
    # Other tunables are kept, the new one appended.
    env = host.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", **on}, **LINUX)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{host.TUNABLE}"
    for environ, kw in [
        ({}, {}),  # not asked for: off by default
        ({host.ENABLE: "0"}, {}),
        ({**on, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {}),  # the user decided
        (on, dict(system="Darwin")),
        (on, dict(libc=("glibc", "2.34"))),  # no such tunable before 2.35
        (on, dict(libc=("", ""))),  # musl: platform.libc_ver() knows no version
        (on, dict(mode="always")),  # every process has huge pages already
        (on, dict(mode="never")),
        (on, dict(mode=None)),  # no THP in this kernel
    ]:
        assert host.huge_pages_env(environ, **{**LINUX, **kw}) is None, (environ, kw)


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    (tmp_path / "enabled").write_text("always [madvise] never\n")
    assert host.thp_mode(str(tmp_path / "enabled")) == "madvise"
    assert host.thp_mode(str(tmp_path / "missing")) is None


_CHILD = """
import ctypes, os
from sfpo_jax import host
host.use_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20  # 64 MiB: malloc serves it from an mmap (numpy would not do: it asks for huge pages itself)
ctypes.memset(libc.malloc(size), 1, size)
with open("/proc/self/smaps_rollup") as f:
    huge = next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))
print(os.environ.get("GLIBC_TUNABLES", ""), huge)
"""


@pytest.mark.skipif(host.huge_pages_env({host.ENABLE: "1"}) is None,
                    reason="this machine has nothing to gain (see huge_pages_env)")
@pytest.mark.parametrize("enable", [True, False])
def test_use_huge_pages_reruns_the_program_and_malloc_then_gets_huge_pages(enable):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host.ENABLE)}
    if enable:
        env[host.ENABLE] = "1"
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
    *tunables, huge_kib = out.stdout.split()
    if not enable:
        assert tunables == [] and int(huge_kib) < 8 << 10
    else:
        assert tunables == [host.TUNABLE] and int(huge_kib) >= 32 << 10  # most of the 64 MiB in 2 MiB pages
