"""attention / attention_backward kernels through the Metal launch layer on msim: every kernel
(variant, dtype), the tilings the head dims select (32, 16 and 8 items per tile), one owner per
threadgroup under a low pipeline limit, strided inputs, GQA with masks and windows, the
deterministic backward, and the head-dim limit. The op contract (numerics over drawn shapes,
edge cases, bad inputs) runs on msim from tests/ops/test_contract.py and
tests/reliability/test_fuzz.py."""

from __future__ import annotations

import pytest
import torch

from metalcore.testing import backends as bk
from metalcore.testing import reference as ref
from metalcore.testing.op_specs import SPECS, Sample, TensorArg
from tests.support import seeded

from .conftest import run_race_child

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _args(b, hq, hkv, lq, lk, d, dv, dtype, mode="none", seed=0):
    q = seeded(b, hq, lq, d, dtype=dtype, seed=seed)
    k = seeded(b, hkv, lk, d, dtype=dtype, seed=seed + 1)
    v = seeded(b, hkv, lk, dv, dtype=dtype, seed=seed + 2)
    mask, causal, left, right = None, False, -1, -1
    if mode == "causal":
        causal = True
    elif mode == "window":
        left, right = 3, 1
    elif mode == "bool":
        g = torch.Generator().manual_seed(seed + 3)
        mask = torch.rand(b, 1, lq, lk, generator=g) < 0.7
        mask[..., -1] = True
    elif mode == "additive":
        g = torch.Generator().manual_seed(seed + 3)
        keep = torch.rand(lq, lk, generator=g) < 0.7
        mask = torch.where(keep, torch.randn(lq, lk, generator=g), float("-inf")).to(dtype)
    return [q, k, v, mask, None, causal, left, right]


def check(msim, args, dtype, backward=True, seed=0):
    """Checks the forward on ``args`` and, with ``backward``, the backward from the float64
    forward's out and lse (rounded as the op stores them) with a drawn grad_out and grad_lse."""
    wrap = [TensorArg(a) if isinstance(a, torch.Tensor) else a for a in args]
    lse_dtype = torch.float32
    bk.check_sample(
        SPECS["attention"], msim, Sample(wrap, dtype=dtype, info={"out_dtypes": {1: lse_dtype}})
    )
    if not backward:
        return
    out, lse = ref.attention(*args)
    out, lse = out.to(dtype), lse.to(lse_dtype)
    go = seeded(*out.shape, dtype=dtype, seed=seed + 7)
    gl = seeded(*lse.shape, seed=seed + 8)
    bargs = [TensorArg(go), TensorArg(gl), *wrap[:3], TensorArg(out), TensorArg(lse), *wrap[3:]]
    bk.check_sample(
        SPECS["attention_backward"], msim, Sample(bargs, dtype=dtype, info={"out_dtypes": {}})
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_kernel(msim_backend, dtype):
    # GQA 2:1, causal, rows past one threadgroup and keys past one tile.
    check(msim_backend, _args(1, 4, 2, 11, 37, 16, 8, dtype, "causal"), dtype)
    # Decode (one query row per head, GQA 4:1) over 300 keys: the forward splits the keys.
    check(msim_backend, _args(1, 4, 1, 1, 300, 16, 8, dtype), dtype, backward=False)


def test_split_keys(msim_backend):
    # 700 keys, 8 packed rows: 5 splits. A bottom-right window leaves the later splits empty,
    # a bool mask hides every key from one row (out 0, lse +inf through the merge), and an
    # additive mask shifts the splits' maxima apart.
    args = _args(1, 4, 1, 2, 700, 8, 8, torch.float32, seed=17)
    check(msim_backend, [*args[:6], 100, 0], torch.float32, backward=False)
    keep = torch.rand(1, 4, 2, 700, generator=torch.Generator().manual_seed(18)) < 0.5
    keep[0, 1, 0] = False
    check(msim_backend, [*args[:3], keep, None, False, -1, -1], torch.float32, backward=False)
    bias = torch.linspace(-30.0, 30.0, 700).expand(2, 700)
    check(msim_backend, [*args[:3], bias, 0.2, False, -1, -1], torch.float32, backward=False)


@pytest.mark.parametrize("mode", ["none", "window", "bool", "additive"])
def test_visibility(msim_backend, mode):
    check(msim_backend, _args(2, 2, 1, 9, 40, 8, 8, torch.float32, mode, seed=3), torch.float32)


@pytest.mark.parametrize(("d", "dv"), [(96, 64), (256, 8), (40, 256)])
def test_large_head_dims(msim_backend, d, dv):
    # Tiles of 16 and 8 items, and head dims past one slot per lane.
    args = _args(1, 1, 1, 3, 20, d, dv, torch.float16, "causal", seed=5)
    check(msim_backend, args, torch.float16)


def test_one_simdgroup_per_threadgroup(msim_backend, max_threads):
    max_threads(32)
    check(
        msim_backend, _args(1, 2, 1, 5, 9, 16, 16, torch.float32, "window", seed=6), torch.float32
    )


def test_strided_inputs(msim_backend):
    # q and v transposed over (heads, seq): strides the launch layer passes through unchanged.
    q = seeded(1, 7, 4, 16, seed=9).transpose(1, 2)
    k = seeded(1, 2, 13, 16, seed=10)
    v = seeded(1, 13, 2, 8, seed=11).transpose(1, 2)
    check(msim_backend, [q, k, v, None, 0.3, False, -1, -1], torch.float32)


def test_backward_is_deterministic(mops):
    args = _args(1, 4, 1, 17, 33, 16, 16, torch.float32, "causal", seed=12)
    out, lse = mops.attention(*args)
    go = seeded(*out.shape, seed=13)
    first = mops.attention_backward(go, None, *args[:3], out, lse, *args[3:])
    second = mops.attention_backward(go, None, *args[:3], out, lse, *args[3:])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["attention", "attention_backward"])
def test_head_dim_limit(mops, op):
    args = _args(1, 1, 1, 2, 3, 257, 8, torch.float32)
    if op == "attention_backward":
        go, lse = torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2)
        args = [go, None, *args[:3], go, lse, *args[3:]]
    with pytest.raises(NotImplementedError, match=rf"metalcore\.{op}: .*head_dim 257"):
        getattr(mops, op)(*args)


def test_schedules(msim_backend, schedule, max_threads):
    # Results must not depend on the lane and threadgroup order or on never-written threadgroup
    # memory.
    max_threads(64)  # two simdgroups: two owners per threadgroup
    check(
        msim_backend,
        _args(1, 2, 1, 5, 19, 16, 8, torch.bfloat16, "bool", seed=14),
        torch.bfloat16,
    )


RACE_CHILD = """
import sys, torch
import metalcore  # noqa: F401
from tests.metal.conftest import _msim_ops_library
torch.set_num_threads(1)
torch.ops.load_library(str(_msim_ops_library()))
ops = torch.ops.metalcore_msim
ops.load_kernels(sys.argv[1])
for limit in (64, 128):
    ops.set_option("max_threads", str(limit))
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 1, 11, 16), torch.randn(1, 1, 11, 8)
    out, lse = ops.attention(q, k, v, None, None, True, -1, -1)
    ops.attention_backward(torch.randn_like(out), lse, q, k, v, out, lse, None, None, True, -1, -1)
print("dispatched:", " ".join(sorted(ops.dispatched_kernel_names())))
"""


def test_race_free(mops):
    # The kernels share K/V (or q/grad_out) tiles between simdgroups through threadgroup memory:
    # ThreadSanitizer must see every tile write ordered before its reads.
    dispatched = run_race_child("-c", RACE_CHILD)
    for variant in ("fwd", "delta", "bwd_dq", "bwd_dkdv"):
        assert f"attention_{variant}_float32" in dispatched


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_backward_nonfinite_reaches_hidden_keys(msim_backend, max_threads, where):
    # Causal over 48 keys with one row (dQ) or key (dK/dV) per threadgroup: whole tiles are
    # hidden from a threadgroup. An Inf in q row 3 or a NaN in k or v row 40 must reach the
    # gradients the unblocked formula gives it (0 * NaN through the hidden pairs), so the
    # pre-pass turns the tile skipping off.
    max_threads(32)
    args = _args(1, 1, 1, 48, 48, 8, 8, torch.float32, "causal", seed=15)
    if where == "q":
        args[0][0, 0, 3, 2] = float("inf")
    else:
        args[1 if where == "k" else 2][0, 0, 40, 3] = float("nan")
    out, lse = ref.attention(*args)
    go = seeded(*out.shape, seed=16)
    wrap = [TensorArg(a) if isinstance(a, torch.Tensor) else a for a in args]
    sample = Sample(
        [TensorArg(go), None, *wrap[:3], TensorArg(out.float()), TensorArg(lse.float()), *wrap[3:]],
        dtype=torch.float32,
        info={"out_dtypes": {}},
    )
    bk.check_sample(SPECS["attention_backward"], msim_backend, sample)
