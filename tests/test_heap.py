"""keep_freed_cpu_memory: after it, a freed large CPU tensor's pages are reused, not re-faulted
(counted as minor page faults, in fresh processes so the setting stays out of the test run)."""

import os
import platform
import subprocess
import sys

import pytest

from tests.support import REPO

CHILD = """
import resource, sys, torch
from metalcore.testing.heap import keep_freed_cpu_memory
kept = keep_freed_cpu_memory() if sys.argv[1] == "keep" else False
def faults_of_one_64mb_output():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)  # allocated, touched, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
# The first calls grow the heap (and fault) until the freed block is big enough to reuse.
faults = [faults_of_one_64mb_output() for _ in range(10)]
print(kept, min(faults[5:]))
"""


def _run(mode):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_freed_memory_is_reused_instead_of_refaulted():
    kept, faults_kept = _run("keep")
    assert kept
    _, faults_default = _run("default")
    # 64 MB is 16384 pages of 4 KB: by default glibc maps a fresh block for every call.
    assert faults_default > 8000, faults_default
    assert faults_kept < 200, faults_kept
