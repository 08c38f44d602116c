"""Every msim detector: the broken kernel is flagged with the right report, the fixed twin runs
clean (no false positives) and matches numpy."""

import re
import shutil

import numpy as np
import pytest
from msim_paths import KERNELS

import msim

BUGS = KERNELS / "bugs" / "bugs.metal"
SOURCE = BUGS.read_text().splitlines()
REL = "tests/msim/kernels/bugs/bugs.metal"  # reports name sources relative to the repo root


def line_of(kernel: str, needle: str) -> int:
    """1-based line of the first `needle` after the definition of `kernel` in bugs.metal."""
    start = next(i for i, text in enumerate(SOURCE) if re.search(rf"\b{kernel}\(", text))
    return next(i + 1 for i in range(start, len(SOURCE)) if needle in SOURCE[i])


def test_early_return_before_barrier(bugs):
    x = np.arange(64, dtype=np.float32)
    y = np.zeros(64, np.float32)
    with pytest.raises(msim.MetalError) as err:
        bugs.dispatch("early_return_bug", [x, y, 40], (64,), threadgroups=(1,))
    msg = str(err.value)
    assert "barrier divergence in kernel 'early_return_bug'" in msg
    assert "thread (40,0,0) of threadgroup (0,0,0)" in msg and "returned while 40 thread(s)" in msg
    assert f"bugs.metal:{line_of('early_return_bug', 'threadgroup_barrier')}" in msg
    bugs.dispatch("early_return_fixed", [x, y, 40], (64,), threadgroups=(1,))
    np.testing.assert_array_equal(
        y[:40], np.where(63 - np.arange(40) < 40, x[63 - np.arange(40)], 0)
    )


def test_barriers_at_different_call_sites(bugs):
    y = np.zeros(64, np.float32)
    with pytest.raises(msim.MetalError) as err:
        bugs.dispatch("divergent_barrier_bug", [y], (64,), threadgroups=(1,))
    msg = str(err.value)
    assert "threads wait at different barriers" in msg
    first = line_of("divergent_barrier_bug", "threadgroup_barrier")
    assert f"32 at {REL}:{first}" in msg and f"32 at {REL}:{first + 3}" in msg
    bugs.dispatch("divergent_barrier_fixed", [y], (64,), threadgroups=(1,))
    np.testing.assert_array_equal(y, np.where(np.arange(64) < 32, 2.0, 1.0))


def test_more_than_1024_threads_per_threadgroup(bugs):
    y = np.zeros(4096, np.float32)
    with pytest.raises(msim.MetalError, match=r"32x33x1 = 1056 exceeds the limit of 1024"):
        bugs.dispatch("divergent_barrier_fixed", [y], (32, 33), threadgroups=(1,))
    with pytest.raises(
        msim.MetalError, match=r"= 512 exceeds the limit of 256 for kernel 'capped'"
    ):
        bugs.dispatch("capped", [y], (512,), threads=(512,))
    bugs.dispatch("capped", [y], (256,), threads=(4096,))
    np.testing.assert_array_equal(y, np.arange(4096))


def test_static_threadgroup_memory_over_32k(bugs):
    y = np.zeros(256, np.float32)
    with pytest.raises(msim.MetalError) as err:
        bugs.dispatch("tg_overflow_bug", [y], (256,), threadgroups=(1,))
    msg = str(err.value)
    assert "threadgroup memory limit exceeded in kernel 'tg_overflow_bug'" in msg
    assert f"bugs.metal:{line_of('tg_overflow_bug', 'scratch[32]')}" in msg
    assert "32896 bytes needed" in msg and "> 32768 bytes" in msg
    bugs.dispatch("tg_overflow_fixed", [y], (256,), threadgroups=(1,))
    np.testing.assert_array_equal(y, np.full(256, 3.0))


def test_dynamic_threadgroup_memory_limit(bugs):
    y = np.zeros(64, np.float32)
    with pytest.raises(msim.MetalError, match=r"lengths total 40000 bytes > 32768"):
        bugs.dispatch("dynamic_tg", [y], (64,), threadgroups=(1,), tg_mem={0: 40000})
    with pytest.raises(msim.MetalError, match=r"threadgroup\(0\)\]\] has no threadgroup memory"):
        bugs.dispatch("dynamic_tg", [y], (64,), threadgroups=(1,))
    bugs.dispatch("dynamic_tg", [y], (64,), threadgroups=(1,), tg_mem={0: 256})
    np.testing.assert_array_equal(y, np.arange(64)[::-1])


def test_reads_of_never_written_threadgroup_memory(bugs):
    x = np.ones(64, np.float32)
    y = np.zeros(1, np.float32)
    bugs.dispatch("uninit_read_bug", [x, y], (64,), threadgroups=(1,))
    assert np.isnan(y[0])  # poison (0xFF bytes) makes the bad read visible in the result
    with pytest.raises(
        msim.MetalError,
        match=r"never-written threadgroup memory in kernel "
        r"'uninit_read_bug': buffer\(1\) 'y' differs at byte 0",
    ):
        bugs.dispatch("uninit_read_bug", [x, y], (64,), threadgroups=(1,), uninit_check=1)
    bugs.dispatch("uninit_read_fixed", [x, y], (64,), threadgroups=(1,), uninit_check=1)
    assert y[0] == 64.0


def test_out_of_bounds_device_access_is_reported_not_fatal(bugs):
    # 2000 floats = 500 float4s; the host rounds up to 2 x 256 threads (seed-review W4).
    p = np.ones(2000, np.float32)
    g = np.ones(2000, np.float32)
    with pytest.raises(msim.MetalError) as err:
        bugs.dispatch("oob_bug", [p, g], (256,), threadgroups=(2,))
    msg = str(err.value)
    assert re.search(
        r"out-of-bounds access to buffer\([01]\) '[pg]' \(bound length 8000 bytes\):"
        r" 0 bytes past its end",
        msg,
    ), msg
    assert "thread (244,0,0) of threadgroup (1,0,0)" in msg
    if shutil.which("llvm-symbolizer-19"):
        assert f"bugs.metal:{line_of('oob_bug', 'p[gid] -=')}" in msg
    bugs.dispatch("oob_fixed", [p, g, 500], (256,), threadgroups=(2,))  # process still healthy
    np.testing.assert_allclose(p, np.full(2000, 0.9, np.float32))


def test_out_of_bounds_write_inside_the_last_granule(bugs):
    y = np.zeros(1001, np.float32)  # 4004 bytes: the byte after the end is not page-aligned
    with pytest.raises(
        msim.MetalError,
        match=r"out-of-bounds write to buffer\(0\) 'y' "
        r"\(bound length 4004 bytes\): 0 bytes past its end",
    ):
        bugs.dispatch("tail_write_bug", [y, 1001], (64,), threads=(1002,))
    y = np.zeros(1000, np.float32)  # 4000 bytes: the write hits the guard page directly
    with pytest.raises(msim.MetalError, match=r"out-of-bounds access to buffer\(0\) 'y'"):
        bugs.dispatch("tail_write_bug", [y, 1000], (64,), threads=(1001,))
    for n in (1000, 1001):
        y = np.zeros(n, np.float32)
        bugs.dispatch("tail_write_fixed", [y, n], (64,), threads=(n + 1,))
        np.testing.assert_array_equal(y, np.ones(n))


def test_bound_range_is_the_buffer_extent(bugs):
    # A view with a byte offset and length: writing past `length` is out of bounds even though
    # the underlying array continues.
    y = np.zeros(100, np.float32)
    with pytest.raises(msim.MetalError, match=r"bound length 40 bytes"):
        bugs.dispatch("tail_write_bug", [msim.Buffer(y, 16, 40), 10], (16,), threads=(11,))
    assert not y.any()  # a failed dispatch leaves host memory untouched


def test_stack_overflow(bugs):
    y = np.zeros(4, np.float32)
    with pytest.raises(msim.MetalError, match=r"stack overflow \(64 KiB per simulated thread"):
        bugs.dispatch("stack_overflow_bug", [y, 100], (4,), threads=(4,))
    bugs.dispatch("stack_overflow_fixed", [y, 100], (4,), threads=(4,))
    last_write = {i * 97 % 64: i for i in range(100)}
    np.testing.assert_array_equal(y, np.full(4, last_write[100 % 64], np.float32))
    bugs.dispatch("stack_overflow_bug", [y, 100], (4,), threads=(4,), stack_size=1 << 20)


def test_missing_barrier_shows_as_execution_order_dependence(bugs):
    x = np.arange(1, 9, dtype=np.float32)
    ref = np.arange(1, 65, dtype=np.float32) * x.sum()

    def run(name, order):
        y = np.zeros(64, np.float32)
        bugs.dispatch(name, [x, y, 8], (64,), threadgroups=(1,), lane_order=order, seed=3)
        return y

    results = [run("missing_barrier_bug", o) for o in ("forward", "reverse", "random")]
    assert not all(np.array_equal(results[0], r) for r in results[1:])
    y = np.zeros(64, np.float32)
    with pytest.raises(
        msim.MetalError,
        match=r"depends on the order threads run in kernel "
        r"'missing_barrier_bug': buffer\(1\) 'y' differs at byte \d+",
    ):
        bugs.dispatch("missing_barrier_bug", [x, y, 8], (64,), threadgroups=(1,), order_check=1)
    bugs.dispatch("missing_barrier_fixed", [x, y, 8], (64,), threadgroups=(1,), order_check=1)
    np.testing.assert_array_equal(y, ref)
    for order in ("forward", "reverse", "random"):
        np.testing.assert_array_equal(run("missing_barrier_fixed", order), ref)


def test_host_errors(bugs):
    y = np.zeros(64, np.float32)
    with pytest.raises(msim.MetalError, match="no kernel with host name 'nope'"):
        bugs.dispatch("nope", [y], (64,), threadgroups=(1,))
    with pytest.raises(msim.MetalError, match=r"'n' \[\[buffer\(2\)\]\] is not bound"):
        bugs.dispatch("early_return_fixed", [y, y], (64,), threadgroups=(1,))
    with pytest.raises(msim.MetalError, match="empty grid"):
        bugs.dispatch("capped", [y], (64,), threads=(0,))
    with pytest.raises(msim.MetalError, match=r"'device float \*' but got a float64 array"):
        bugs.dispatch("capped", [np.zeros(64)], (64,), threads=(64,))
    enc = bugs.encoder()
    with pytest.raises(msim.MetalError, match="at most 4 KB"):
        enc.set_bytes(0, bytes(5000))
    with pytest.raises(msim.MetalError, match="dispatch without a pipeline"):
        enc.dispatch_threads((1,), (1,))
    with pytest.raises(msim.MetalError, match="lane_order must be forward, reverse or random"):
        enc.set_option("lane_order", "sideways")


def test_spin_wait_deadlock_is_interrupted(bugs):
    y = np.zeros(2, np.uint32)
    with pytest.raises(msim.MetalError, match=r"'spin_wait_bug' still running after 1 s"):
        bugs.dispatch("spin_wait_bug", [y], (2,), threadgroups=(1,), timeout=1)
    bugs.dispatch("spin_wait_fixed", [y], (2,), threadgroups=(1,), timeout=1)
    np.testing.assert_array_equal(y, [1, 2])
    z = np.zeros(4, np.float32)
    bugs.dispatch("capped", [z], (4,), threads=(4,))  # the library is still usable
    np.testing.assert_array_equal(z, np.arange(4))


@pytest.mark.parametrize("check", ["uninit_check", "order_check"])
def test_rerun_checks_have_no_false_positives(lib, check):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 300)).astype(np.float32)
    y = np.zeros_like(x)
    args = [x, np.ones(300, np.float32), y, 300, np.float32(1e-6)]
    lib.dispatch("rmsnorm_float", args, (96,), threadgroups=(5,), **{check: 1})
    a = rng.standard_normal((20, 30)).astype(np.float32)
    out = np.zeros((30, 20), np.float32)
    shape = np.array([20, 30], np.uint32)
    lib.dispatch("transpose16", [a, out, shape], (16, 16), threadgroups=(2, 2), **{check: 1})
    np.testing.assert_array_equal(out, a.T)
    v = rng.standard_normal(200).astype(np.float32)
    kept, count = np.zeros(200, np.float32), np.zeros(1, np.uint32)
    lib.dispatch("compact", [v, kept, count, 200], (64,), threads=(200,), **{check: 1})
    assert count[0] == (v > 0).sum()


def test_threadgroup_array_overrun(bugs):
    y = np.zeros(64, np.float32)
    with pytest.raises(msim.MetalError) as err:
        bugs.dispatch("tg_oob_bug", [y], (64,), threadgroups=(1,))
    msg = str(err.value)
    decl = line_of("tg_oob_bug", "threadgroup float tile[64]")
    assert f"out-of-bounds access to threadgroup variable declared at {REL}:{decl}" in msg
    assert "(256 bytes): 0 bytes past its end" in msg and "thread (63,0,0)" in msg
    bugs.dispatch("tg_oob_fixed", [y], (64,), threadgroups=(1,))
    np.testing.assert_array_equal(y, (np.arange(64) + 1) % 64)
