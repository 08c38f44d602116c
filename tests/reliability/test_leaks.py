"""Leaks: calling every op thousands of times (the op itself and, for differentiable ops, forward
plus backward through autograd) leaves process RSS, and allocated device memory where a GPU
backend runs, flat."""

import ctypes
import gc
import os

import pytest
import torch

from metalcore.testing import backends as bk
from metalcore.testing.op_specs import SPECS, typical_samples

CALLS = int(os.environ.get("METALCORE_LEAK_CALLS", "2000"))
# Allocator noise after warm-up stays well below this. RSS only counts touched pages, and a
# leak first reuses memory freed earlier, so the floor of what this detects is about 1 KiB per
# call (2000 calls); the self-test below plants a 4 KiB one, the size of a small leaked output.
RSS_SLACK = 1.5 * 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_heap() -> None:
    # Free heap pages left by earlier tests would absorb a leak without raising RSS; glibc's
    # malloc_trim hands them back to the OS so that new allocations must touch new pages.
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_growth(fn, calls: int = CALLS) -> int:
    """RSS growth over ``calls`` calls of ``fn``, after a warm-up that fills allocator caches.
    The free heap is released before the warm-up, not after it: released after, the op's own
    steady working set (temporaries that glibc serves from the heap once its mmap threshold has
    risen) is faulted back in during the measured calls, a one-off 2 MiB that a full test run
    read as a leak of ATen-BLAS ops (lora_linear, fused_linear_cross_entropy)."""
    gc.collect()
    _release_free_heap()
    for _ in range(max(50, calls // 4)):
        fn()
    gc.collect()
    before = rss_bytes()
    for _ in range(calls):
        fn()
    gc.collect()
    return rss_bytes() - before


needs_proc = pytest.mark.skipif(
    not os.path.exists("/proc/self/statm"), reason="RSS is read from /proc"
)


def _op_calls(spec, device="cpu"):
    samples = typical_samples(spec, 3, lo=1024)
    materialized = [s.materialize(device) for s in samples]
    be = bk.backend("cpu") if device == "cpu" else None

    def fn():
        for args, kwargs in materialized:
            if be is not None:
                be.call(spec, args, kwargs)
            else:
                spec.overload()(*args, **kwargs)
            if spec.autograd is not None:
                spec.autograd(args, kwargs)

    return fn


def settled_growth(fn, tries: int = 3) -> int:
    """The smallest of up to ``tries`` measurements, stopping at the first under the slack: a
    leak grows RSS in every round, while a one-off jump (a new malloc arena for a worker thread,
    seen once in CI at 1.7 MiB) does not repeat."""
    growth = rss_growth(fn)
    for _ in range(tries - 1):
        if growth < RSS_SLACK:
            break
        growth = min(growth, rss_growth(fn))
    return growth


@needs_proc
def test_rss_detector_catches_a_planted_leak():
    kept = []
    growth = settled_growth(lambda: kept.append(torch.ones(1024)))  # 4 KiB per call
    assert growth > RSS_SLACK, f"planted leak of 4 KiB/call grew RSS by only {growth} bytes"


@needs_proc
@pytest.mark.parametrize("op", sorted(SPECS))
def test_cpu_rss_stays_flat(op):
    spec = SPECS[op]
    why = bk.backend("cpu").op_unavailable(op)
    if why:
        pytest.skip(why)
    growth = settled_growth(_op_calls(spec))
    assert growth < RSS_SLACK, (
        f"metalcore.{op}: RSS grew {growth / 2**20:.2f} MiB over {CALLS} calls"
    )


@pytest.mark.parametrize("device", ["cuda", "mps"])
@pytest.mark.parametrize("op", sorted(SPECS))
def test_gpu_allocated_memory_stays_flat(op, device):
    be = bk.backend(device)
    why = be.op_unavailable(op)
    if why:
        pytest.skip(why)
    allocated = (
        torch.cuda.memory_allocated if device == "cuda" else torch.mps.current_allocated_memory
    )
    sync = torch.cuda.synchronize if device == "cuda" else torch.mps.synchronize
    fn = _op_calls(SPECS[op], device)
    fn()
    sync()
    before = allocated()
    for _ in range(CALLS // 4):
        fn()
    sync()
    assert allocated() == before, f"metalcore.{op} on {device}: allocated memory grew"
