"""tune_cpu_allocator: glibc serves multi-MB blocks from the reusable heap instead of mmap."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from ntkit.train import tune_cpu_allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Where a fresh 16 MiB malloc lands: "mmap" (its own mapping, hblkhd grows) or "heap".
PROBE = r"""
import ctypes, sys
from ntkit.train import tune_cpu_allocator
print(tune_cpu_allocator())
class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MI
libc.malloc.restype = ctypes.c_void_p
before = libc.mallinfo2().hblkhd
p = libc.malloc(16 << 20)
print("mmap" if libc.mallinfo2().hblkhd - before >= 16 << 20 else "heap")
libc.free(ctypes.c_void_p(p))
"""


def _probe(env_extra: dict[str, str]) -> list[str]:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env)
    return out.stdout.split()


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_multi_mb_blocks_come_from_the_heap_after_tuning() -> None:
    assert _probe({"NTKIT_MALLOC": ""}) == ["True", "heap"]
    assert _probe({"NTKIT_MALLOC": "system"}) == ["False", "mmap"]  # glibc default: 16 MiB is mmapped


def test_bad_thresholds_raise() -> None:
    with pytest.raises(ValueError, match="mmap_threshold=0"):
        tune_cpu_allocator(mmap_threshold=0)
    with pytest.raises(ValueError, match="trim_threshold"):
        tune_cpu_allocator(trim_threshold=1 << 40)
