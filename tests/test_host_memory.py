"""jaxseg.host_memory: a freed large block is reused without page faults, where glibc allows it."""
import json
import os
import pathlib
import platform
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BLOCK = 96 << 20  # over glibc's mmap threshold and over what a worker thread's arena can hold

# In a fresh process (mallopt settings are process-wide): a worker thread, as XLA's are, fills and
# frees a large block twice; the second round's minor page faults say whether the pages were kept.
_PROBE = f"""
import ctypes, json, resource, sys, threading
from jaxseg import host_memory
applied = host_memory.reuse_freed_memory() if sys.argv[1] == "tuned" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
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
def run():
    worker = threading.Thread(target=fill_and_free)
    worker.start(); worker.join()
if sys.argv[2:] == ["mapped"]:
    with host_memory.large_blocks_mapped():
        run()
elif sys.argv[2:] == ["after_mapped"]:
    with host_memory.large_blocks_mapped():
        pass
    run()
else:
    run()
print(json.dumps({{"applied": applied, "second_round_faults": faults[1]}}))
"""


def _probe(mode: str, *extra: str, opt_out: bool = False) -> dict:
    from jaxseg.host_memory import OPT_OUT_ENV

    env = {k: v for k, v in os.environ.items() if k != OPT_OUT_ENV}
    if opt_out:
        env[OPT_OUT_ENV] = "1"
    out = subprocess.run([sys.executable, "-c", _PROBE, mode, *extra], capture_output=True, text=True,
                         cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_freed_large_block_is_reused_without_page_faults_unless_opted_out():
    pages = BLOCK // 4096
    default, tuned = _probe("default"), _probe("tuned")
    opted_out, mapped = _probe("tuned", opt_out=True), _probe("tuned", "mapped")
    after_mapped = _probe("tuned", "after_mapped")
    assert tuned["applied"] and mapped["applied"] and not opted_out["applied"]
    # Without the settings every round maps fresh pages (far fewer faults with huge pages).
    if default["second_round_faults"] < pages // 4:
        pytest.skip("this kernel maps the block without per-page faults; nothing to compare")
    assert tuned["second_round_faults"] < pages // 100
    assert opted_out["second_round_faults"] >= pages // 4
    # Inside large_blocks_mapped() the block is unmapped at free, as by default.
    assert mapped["second_round_faults"] >= pages // 4
    # And after it, training's blocks are kept again (validation ran inside it, then training).
    assert after_mapped["second_round_faults"] < pages // 100


def test_reuse_freed_memory_is_a_no_op_off_glibc(monkeypatch):
    from jaxseg import host_memory

    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert host_memory.reuse_freed_memory() is False
