"""rmsnorm / fused_add_rmsnorm through the Metal launch layer and kernels (msim on CPU tensors),
against the CPU kernels and float64 references. ``check_*`` helpers take the op namespace and
device, so tests/mps runs the same cases on MPS tensors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from metalcore.testing import reference as ref
from tests.support import FLOAT_DTYPES, LAYOUTS, assert_close, make_layout

cpu = torch.ops.metalcore

# Below a simdgroup, not multiples of the 4 reads per thread, one full simdgroup, a few groups.
row_sizes = st.sampled_from([1, 2, 3, 7, 31, 32, 33, 100, 257, 1000])
lead_shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)


def check_forward(ops, device, lead, n, dtype, layout, with_weight, fused):
    x = make_layout(torch.randn(*lead, n, dtype=dtype), layout, device)
    w = torch.randn(n, dtype=dtype, device=device) if with_weight else None
    if fused:
        r = make_layout(torch.randn(*lead, n, dtype=dtype), layout, device)
        y, h = ops.fused_add_rmsnorm(x, r, w, 1e-6)
        y_cpu, h_cpu = cpu.fused_add_rmsnorm(x.cpu(), r.cpu(), None if w is None else w.cpu(), 1e-6)
        torch.testing.assert_close(h.cpu(), h_cpu, rtol=0, atol=0)  # one rounding, as unfused
        y_ref = ref.rmsnorm(h_cpu, None if w is None else w.cpu(), 1e-6)
    else:
        y = ops.rmsnorm(x, w, 1e-6)
        y_cpu = cpu.rmsnorm(x.cpu(), None if w is None else w.cpu(), 1e-6)
        y_ref = ref.rmsnorm(x.cpu(), None if w is None else w.cpu(), 1e-6)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert_close(y.cpu(), y_ref)
    assert_close(y.cpu(), y_cpu)


def check_backward(ops, device, lead, n, dtype, layout, with_weight, grad_res):
    x = make_layout(torch.randn(*lead, n, dtype=dtype), layout, device)
    g = make_layout(torch.randn(*lead, n, dtype=dtype), layout, device)
    w = torch.randn(n, dtype=dtype, device=device) if with_weight else None
    gr = torch.randn(*lead, n, dtype=dtype, device=device) if grad_res else None
    if grad_res:
        dx, dw = ops.fused_add_rmsnorm_backward(g, gr, x, w, 1e-5)
    else:
        dx, dw = ops.rmsnorm_backward(g, x, w, 1e-5)
    x64 = x.cpu().double().requires_grad_()
    w64 = w.cpu().double().requires_grad_() if with_weight else None
    ref.rmsnorm(x64, w64, 1e-5).backward(g.cpu().double())
    dx_ref = x64.grad + (gr.cpu().double() if grad_res else 0)
    assert_close(dx.cpu(), dx_ref, dtype, rtol=3 * 1.6e-2 if dtype == torch.bfloat16 else None)
    if with_weight:
        # dweight sums over every row: the tolerance grows with the row count.
        rows = max(1, x.numel() // max(n, 1))
        tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
        tol *= max(1.0, rows**0.5)
        torch.testing.assert_close(dw.cpu().double(), w64.grad, rtol=tol, atol=tol)
    else:
        assert dw.shape == (0,)


@given(
    lead=lead_shapes,
    n=row_sizes,
    dtype=st.sampled_from(FLOAT_DTYPES),
    layout=st.sampled_from(LAYOUTS),
    with_weight=st.booleans(),
    fused=st.booleans(),
)
def test_forward(mops, lead, n, dtype, layout, with_weight, fused):
    check_forward(mops, "cpu", lead, n, dtype, layout, with_weight, fused)


@given(
    lead=lead_shapes,
    n=row_sizes,
    dtype=st.sampled_from(FLOAT_DTYPES),
    layout=st.sampled_from(LAYOUTS),
    with_weight=st.booleans(),
    grad_res=st.booleans(),
)
def test_backward(mops, lead, n, dtype, layout, with_weight, grad_res):
    check_backward(mops, "cpu", lead, n, dtype, layout, with_weight, grad_res)


# (threadgroup limit, row length): the register-resident variants hold 4 * limit elements, so
# each pair sits exactly at a cutoff and just across it (by one element, and by one vec4: the
# contiguous layouts of multiples of 4 take the _vec4 kernels, the offset ones never do).
CUTOFFS = [(1024, 4096), (1024, 4097), (128, 512), (128, 513), (128, 516), (32, 128), (32, 132)]


@pytest.mark.parametrize("limit,n", CUTOFFS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_variant_cutoffs(mops, max_threads, limit, n, dtype):
    max_threads(limit)
    check_forward(mops, "cpu", (2,), n, dtype, "offset", True, False)
    check_forward(mops, "cpu", (2,), n, dtype, "contiguous", False, True)
    check_backward(mops, "cpu", (3,), n, dtype, "offset", True, True)
    check_backward(mops, "cpu", (3,), n, dtype, "contiguous", False, False)


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 41, 4103])
def test_backward_row_blocking(mops, max_threads, rows):
    # Rows per threadgroup and the 512-group cap (4103 rows) of the dweight partials.
    max_threads(32)
    check_backward(mops, "cpu", (rows,), 5, torch.float32, "contiguous", True, False)
    check_backward(mops, "cpu", (rows,), 200, torch.float32, "contiguous", True, True)


def check_empty_and_special(ops, device):
    for shape in [(0, 16), (3, 0), (0,)]:
        x = torch.randn(shape, device=device)
        w = torch.randn(shape[-1], device=device)
        assert ops.rmsnorm(x, w, 1e-6).shape == x.shape
        y, h = ops.fused_add_rmsnorm(x, x, w, 1e-6)
        assert y.shape == h.shape == x.shape
        dx, dw = ops.rmsnorm_backward(x, x, w, 1e-6)
        assert dx.shape == x.shape and torch.equal(dw.cpu(), torch.zeros(shape[-1]))
    for n in (16, 5000):  # both forward variants
        x = torch.randn(3, n)
        x[0, 3] = float("nan")
        x[1, 5] = float("inf")
        y = ops.rmsnorm(x.to(device), None, 1e-6).cpu()
        torch.testing.assert_close(y, cpu.rmsnorm(x, None, 1e-6), equal_nan=True)
        assert torch.isnan(y[0]).all() and torch.isfinite(y[2]).all()
        g = torch.randn(3, n)
        dx, _ = ops.rmsnorm_backward(g.to(device), x.to(device), None, 1e-6)
        assert torch.isnan(dx[0].cpu()).all() and torch.isfinite(dx[2].cpu()).all()


def test_empty_and_special_values(mops):
    check_empty_and_special(mops, "cpu")


def test_bad_inputs_name_op_and_argument(mops):
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match=r"rmsnorm: 'input' must be float16, bfloat16 or"):
        mops.rmsnorm(x.double(), None, 1e-6)
    with pytest.raises(ValueError, match=r"metalcore\.rmsnorm: 'weight' must have shape \[8\]"):
        mops.rmsnorm(x, torch.randn(7), 1e-6)
    with pytest.raises(ValueError, match=r"metalcore\.fused_add_rmsnorm: 'residual' must have"):
        mops.fused_add_rmsnorm(x, torch.randn(4, 9), None, 1e-6)
    with pytest.raises(ValueError, match=r"fused_add_rmsnorm_backward: 'grad_residual_out' must"):
        mops.fused_add_rmsnorm_backward(x, torch.randn(4, 9), x, None, 1e-6)
