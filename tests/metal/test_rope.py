"""rope / rope_backward through the Metal launch layer and kernels (msim on CPU tensors), against
the CPU kernel and float64 references: half-split and interleaved pairs, GQA head counts,
partial rotary, every table form, float32 tables with 16-bit q/k, strided q/k."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from metalcore.testing import reference as ref
from tests.support import FLOAT_DTYPES, assert_close, make_layout

cpu = torch.ops.metalcore

# Head dims with odd pair counts, below and above a simdgroup of pairs; heads not multiples of
# the 4 heads per thread.
HEAD_DIMS = [2, 6, 10, 18, 64, 80]
LAYOUTS = ["contiguous", "offset", "transposed", "heads_transposed"]


@st.composite
def cases(draw):
    d = draw(st.sampled_from(HEAD_DIMS))
    return dict(
        b=draw(st.integers(1, 2)),
        hq=draw(st.integers(1, 6)),
        hk=draw(st.integers(1, 3)),
        s=draw(st.integers(1, 9)),
        d=d,
        rot=draw(st.one_of(st.just(d), st.integers(0, d // 2).map(lambda i: 2 * i))),
        dtype=draw(st.sampled_from(FLOAT_DTYPES)),
        table=draw(st.sampled_from(["2d", "3d", "batch1"])),
        fp32_table=draw(st.booleans()),
        layout=draw(st.sampled_from(LAYOUTS)),
        interleaved=draw(st.booleans()),
    )


def _qk_layout(t, layout, device):
    if layout == "heads_transposed":  # what HF's projections give: [B, S, H, D].transpose(1, 2)
        return t.transpose(1, 2).contiguous().transpose(1, 2).to(device)
    return make_layout(t, layout, device)


def make_inputs(c, device):
    reduced = c["dtype"] in (torch.float16, torch.bfloat16)
    tdtype = torch.float32 if c["fp32_table"] and reduced else c["dtype"]
    shape = {"2d": (c["s"], c["rot"]), "3d": (c["b"], c["s"], c["rot"])}.get(
        c["table"], (1, c["s"], c["rot"])
    )
    # Random (not rotation-shaped) tables, so every coefficient position is exercised.
    cos, sin = torch.randn(shape, dtype=tdtype), torch.randn(shape, dtype=tdtype)
    q = torch.randn(c["b"], c["hq"], c["s"], c["d"], dtype=c["dtype"])
    k = torch.randn(c["b"], c["hk"], c["s"], c["d"], dtype=c["dtype"])
    return [_qk_layout(q, c["layout"], device), _qk_layout(k, c["layout"], device)], [
        cos.to(device),
        sin.to(device),
    ]


def check_rope(ops, device, c):
    (q, k), (cos, sin) = make_inputs(c, device)
    il = c["interleaved"]
    qo, ko = ops.rope(q, k, cos, sin, il)
    assert qo.is_contiguous() and ko.is_contiguous() and qo.shape == q.shape
    args_cpu = [t.cpu() for t in (q, k, cos, sin)]
    q_ref, k_ref = ref.rope(*args_cpu, il)
    q_cpu, k_cpu = cpu.rope(*args_cpu, il)
    for got, want, other in ((qo, q_ref, q_cpu), (ko, k_ref, k_cpu)):
        assert_close(got.cpu(), want)
        assert_close(got.cpu(), other)

    gq = _qk_layout(torch.randn(q.shape, dtype=q.dtype), c["layout"], device)
    gk = _qk_layout(torch.randn(k.shape, dtype=k.dtype), c["layout"], device)
    dq, dk = ops.rope_backward(gq, gk, cos, sin, il)
    leaves = [t.cpu().double().requires_grad_() for t in (q, k)]
    outs = ref.rope(*leaves, cos.cpu().double(), sin.cpu().double(), il)
    torch.autograd.backward(outs, (gq.cpu().double(), gk.cpu().double()))
    for got, leaf in zip((dq, dk), leaves):
        assert_close(got.cpu(), leaf.grad, c["dtype"])


@given(c=cases())
def test_forward_backward(mops, c):
    check_rope(mops, "cpu", c)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("fp32_table", [False, True])
def test_every_kernel(mops, interleaved, dtype, fp32_table):
    c = dict(b=2, hq=5, hk=2, s=3, d=18, rot=12, dtype=dtype, table="3d", fp32_table=fp32_table)
    check_rope(mops, "cpu", dict(c, layout="heads_transposed", interleaved=interleaved))


@pytest.mark.parametrize("limit", [32, 64])
def test_small_threadgroup_limit(mops, max_threads, limit):
    max_threads(limit)
    c = dict(b=1, hq=4, hk=1, s=7, d=80, rot=64, dtype=torch.float32, table="2d")
    check_rope(mops, "cpu", dict(c, fp32_table=False, layout="offset", interleaved=False))


def check_empty_and_special(ops, device):
    cos, sin = torch.randn(5, 8, device=device), torch.randn(5, 8, device=device)
    q, k = torch.randn(0, 2, 5, 8, device=device), torch.randn(0, 1, 5, 8, device=device)
    assert [t.shape for t in ops.rope(q, k, cos, sin, False)] == [q.shape, k.shape]
    q = torch.randn(1, 2, 5, 8)
    q[0, 0, 1, 3] = float("nan")
    q[0, 1, 2, 0] = float("inf")
    k = torch.randn(1, 1, 5, 8)
    got = ops.rope(q.to(device), k.to(device), cos, sin, False)
    want = cpu.rope(q, k, cos.cpu(), sin.cpu(), False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, equal_nan=True)


def test_empty_and_special_values(mops):
    check_empty_and_special(mops, "cpu")


def test_bad_inputs(mops):
    q, k = torch.randn(1, 2, 3, 8, dtype=torch.float64), torch.randn(1, 2, 3, 8)
    cos = torch.randn(3, 8)
    with pytest.raises(TypeError, match=r"metalcore\.rope: 'q' must be float16, bfloat16 or"):
        mops.rope(q, k.double(), cos.double(), cos.double(), False)
    with pytest.raises(ValueError, match=r"metalcore\.rope: 'cos' last dim \(rot\) must be even"):
        mops.rope(k, k, cos[:, :3], cos[:, :3], False)
