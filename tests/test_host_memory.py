"""jaxseg.host_memory: a freed large block is reused without page faults, where glibc allows it."""
import json
import platform
import subprocess
import sys

import pytest

BLOCK = 96 << 20  # over the 64 MB that a worker thread's glibc arena serves without mmap

# In a fresh process (mallopt settings are process-wide): a worker thread, as XLA's are, fills and
# frees a large block twice; the second round's minor page faults say whether the pages were kept.
_PROBE = f"""
import ctypes, json, resource, sys, threading
from jaxseg import host_memory
applied = host_memory.reuse_freed_memory() if sys.argv[1] == "tuned" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
faults = []
def fill_and_free():
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc({BLOCK})
        libc.memset(block, 1, {BLOCK})
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
worker = threading.Thread(target=fill_and_free)
worker.start(); worker.join()
print(json.dumps({{"applied": applied, "second_round_faults": faults[1]}}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_freed_large_block_is_reused_without_page_faults():
    pages = BLOCK // 4096
    default, tuned = _probe("default"), _probe("tuned")
    assert tuned["applied"]
    # Without the settings every round maps fresh pages (fewer faults only with huge pages).
    if default["second_round_faults"] < pages // 512:
        pytest.skip("this kernel maps the block without per-page faults; nothing to compare")
    assert tuned["second_round_faults"] < default["second_round_faults"] // 20


def test_reuse_freed_memory_is_a_no_op_off_glibc(monkeypatch):
    from jaxseg import host_memory

    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert host_memory.reuse_freed_memory() is False
