"""rmsnorm and fused_add_rmsnorm: numerics, gradients, opcheck, compile, export, bad input."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import metalcore
from metalcore.testing import reference as ref
from tests.support import (
    FLOAT_DTYPES,
    LAYOUTS,
    assert_close,
    check_compile_no_recompile,
    export_roundtrip,
    make_layout,
)

ops = torch.ops.metalcore

# Row lengths around the CPU vector widths (8/16 lanes) and odd sizes; leading shapes of 1-3 dims.
row_sizes = st.sampled_from([1, 2, 7, 8, 9, 17, 31, 64, 100, 257, 1024])
lead_shapes = st.lists(st.integers(1, 6), min_size=0, max_size=3).map(tuple)


@given(
    lead=lead_shapes,
    n=row_sizes,
    dtype=st.sampled_from(FLOAT_DTYPES),
    layout=st.sampled_from(LAYOUTS),
    with_weight=st.booleans(),
)
def test_forward_matches_float64_reference(lead, n, dtype, layout, with_weight):
    x = make_layout(torch.randn(*lead, n, dtype=dtype), layout)
    w = torch.randn(n, dtype=dtype) if with_weight else None
    y = metalcore.rmsnorm(x, w, 1e-6)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert_close(y, ref.rmsnorm(x, w, 1e-6))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_forward_matches_torch_and_hf(dtype):
    x = torch.randn(4, 33, 4096, dtype=dtype)
    w = torch.randn(4096, dtype=dtype)
    y = metalcore.rmsnorm(x, w)  # eps=None -> finfo.eps, as F.rms_norm
    assert_close(y, F.rms_norm(x.float(), (4096,), w.float()))
    # Hugging Face rounds before the weight multiply: one extra rounding of difference.
    hf = ref.hf_llama_rmsnorm(x, w, 1e-6)
    assert_close(metalcore.rmsnorm(x, w, 1e-6), hf, rtol=2 * 1.6e-2, atol=2 * 1.6e-2)


@given(
    lead=lead_shapes,
    n=row_sizes,
    dtype=st.sampled_from(FLOAT_DTYPES),
    layout=st.sampled_from(LAYOUTS),
    with_weight=st.booleans(),
)
def test_backward_matches_float64_autograd(lead, n, dtype, layout, with_weight):
    x = make_layout(torch.randn(*lead, n, dtype=dtype), layout)
    w = torch.randn(n, dtype=dtype) if with_weight else None
    g = make_layout(torch.randn(*lead, n, dtype=dtype), layout)
    dx, dw = ops.rmsnorm_backward(g, x, w, 1e-5)
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_() if with_weight else None
    ref.rmsnorm(x64, w64, 1e-5).backward(g.double())
    assert_close(dx, x64.grad, dtype, rtol=3 * 1.6e-2 if dtype == torch.bfloat16 else None)
    if with_weight:
        # grad_weight sums over every row: tolerance grows with the row count.
        rows = max(1, x.numel() // max(n, 1))
        scale = max(1.0, rows**0.5)
        tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype] * scale
        torch.testing.assert_close(dw.double(), w64.grad, rtol=tol, atol=tol)
    else:
        assert dw.shape == (0,)


def test_gradcheck_float64():
    x = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.rmsnorm(a, b, 1e-5), (x, w))
    assert torch.autograd.gradcheck(lambda a: ops.rmsnorm(a, None, 1e-5), (x,))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.fused_add_rmsnorm(a, b, c, 1e-5), (x, r, w))
    # Only one output used: the other gets no gradient (None), which the backward handles.
    assert torch.autograd.gradcheck(
        lambda a, b, c: ops.fused_add_rmsnorm(a, b, c, 1e-5)[0], (x, r, w)
    )
    assert torch.autograd.gradcheck(lambda a, b: ops.fused_add_rmsnorm(a, b, None, 1e-5)[1], (x, r))


@given(
    lead=lead_shapes,
    n=row_sizes,
    dtype=st.sampled_from(FLOAT_DTYPES),
    layout=st.sampled_from(LAYOUTS),
    with_weight=st.booleans(),
    rg=st.booleans(),
)
def test_opcheck(lead, n, dtype, layout, with_weight, rg):
    x = make_layout(torch.randn(*lead, n, dtype=dtype), layout).requires_grad_(rg)
    r = torch.randn(*lead, n, dtype=dtype, requires_grad=rg)
    w = torch.randn(n, dtype=dtype, requires_grad=rg) if with_weight else None
    g = torch.randn(*lead, n, dtype=dtype)
    torch.library.opcheck(ops.rmsnorm.default, (x, w, 1e-6))
    torch.library.opcheck(ops.fused_add_rmsnorm.default, (x, r, w, 1e-6))
    xd, wd = x.detach(), (w.detach() if w is not None else None)
    torch.library.opcheck(ops.rmsnorm_backward.default, (g, xd, wd, 1e-6))
    torch.library.opcheck(ops.fused_add_rmsnorm_backward.default, (g, g, xd, wd, 1e-6))
    torch.library.opcheck(ops.fused_add_rmsnorm_backward.default, (g, None, xd, wd, 1e-6))


@given(
    lead=lead_shapes, n=row_sizes, dtype=st.sampled_from(FLOAT_DTYPES), with_weight=st.booleans()
)
def test_fused_add_matches_unfused(lead, n, dtype, with_weight):
    x = torch.randn(*lead, n, dtype=dtype)
    r = torch.randn(*lead, n, dtype=dtype)
    w = torch.randn(n, dtype=dtype) if with_weight else None
    y, h = metalcore.fused_add_rmsnorm(x, r, w, 1e-6)
    y_ref, h_ref = ref.fused_add_rmsnorm(x, r, w, 1e-6)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)  # the sum is rounded exactly once
    assert_close(y, y_ref)


def test_fused_add_backward_matches_float64_autograd():
    x = torch.randn(5, 7, 130, dtype=torch.float32)
    r = torch.randn(5, 7, 130, dtype=torch.float32)
    w = torch.randn(130, dtype=torch.float32)
    gy, gh = torch.randn_like(x), torch.randn_like(x)
    leaves = [t.clone().requires_grad_() for t in (x, r, w)]
    y, h = metalcore.fused_add_rmsnorm(*leaves, 1e-6)
    torch.autograd.backward((y, h), (gy, gh))
    leaves64 = [t.double().requires_grad_() for t in (x, r, w)]
    y64, h64 = ref.fused_add_rmsnorm(*leaves64, 1e-6)
    torch.autograd.backward((y64, h64), (gy.double(), gh.double()))
    for a, b in zip(leaves, leaves64):
        torch.testing.assert_close(a.grad, b.grad.float(), rtol=1e-4, atol=1e-4)


def test_training_step_through_module_graph():
    # Gradients reach every leaf through a small pre-norm block (no silently dropped grads).
    x = torch.randn(2, 8, 32, requires_grad=True)
    w = torch.ones(32, requires_grad=True)
    lin = torch.nn.Linear(32, 32)
    y, h = metalcore.fused_add_rmsnorm(lin(x), x, w)
    (metalcore.rmsnorm(y, w) + h).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (x, w, lin.weight))


def test_empty_and_special_values():
    for shape in [(0, 16), (3, 0), (0,)]:
        x = torch.randn(shape)
        w = torch.randn(shape[-1])
        assert metalcore.rmsnorm(x, w).shape == x.shape
        dx, dw = ops.rmsnorm_backward(x, x, w, 1e-6)
        assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w))
    x = torch.randn(3, 16)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    y = metalcore.rmsnorm(x, None, 1e-6)
    expected = F.rms_norm(x, (16,), None, 1e-6)
    torch.testing.assert_close(y, expected, equal_nan=True)
    assert torch.isnan(y[0]).all() and torch.isfinite(y[2]).all()


def test_bad_inputs_name_op_and_argument():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"metalcore\.rmsnorm: 'weight' must have shape \[8\]"):
        ops.rmsnorm(x, torch.randn(7), 1e-6)
    with pytest.raises(TypeError, match=r"metalcore\.rmsnorm: 'weight' must have the same dtype"):
        ops.rmsnorm(x, torch.randn(8, dtype=torch.float64), 1e-6)
    with pytest.raises(TypeError, match=r"metalcore\.rmsnorm: 'input' must be float16"):
        ops.rmsnorm(torch.ones(4, 8, dtype=torch.int32), None, 1e-6)
    with pytest.raises(ValueError, match=r"metalcore\.rmsnorm: 'eps' must be >= 0"):
        ops.rmsnorm(x, None, -1.0)
    with pytest.raises(ValueError, match=r"metalcore\.rmsnorm: 'input' must have at least 1"):
        ops.rmsnorm(torch.tensor(1.0), None, 1e-6)
    with pytest.raises(ValueError, match=r"metalcore\.fused_add_rmsnorm: 'residual' must have"):
        ops.fused_add_rmsnorm(x, torch.randn(4, 9), None, 1e-6)
    with pytest.raises(ValueError, match=r"metalcore\.rmsnorm_backward: 'grad_out' must have"):
        ops.rmsnorm_backward(torch.randn(3, 8), x, None, 1e-6)
    if torch.device("meta").type == "meta":
        with pytest.raises(RuntimeError, match=r"metalcore\.rmsnorm: 'weight' must be on the same"):
            ops.rmsnorm(x, torch.randn(8, device="meta"), 1e-6)


def test_double_backward_is_a_clear_error():
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(ops.rmsnorm(x, None, 1e-6).sum(), x, create_graph=True)


def test_compile_fullgraph_without_recompiles():
    def block(x, r, w):
        y, h = ops.fused_add_rmsnorm(x, r, w, 1e-6)
        return ops.rmsnorm(y, w, 1e-6) * 2 + h

    def make_args(rows):
        return (torch.randn(rows, 3, 64), torch.randn(rows, 3, 64), torch.randn(64))

    check_compile_no_recompile(block, make_args, [5, 9, 17, 33])

    # Forward + backward under compile: the backward graph holds the metalcore backward ops.
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    args = [t.requires_grad_() for t in make_args(6)]
    compiled(*args).sum().backward()
    grads = [a.grad.clone() for a in args]
    args2 = [a.detach().clone().requires_grad_() for a in args]
    block(*args2).sum().backward()
    for g1, g2 in zip(grads, (a.grad for a in args2)):
        torch.testing.assert_close(g1, g2)


class _Block(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n))

    def forward(self, x, r):
        y, h = metalcore.fused_add_rmsnorm(x, r, self.weight, 1e-6)
        return metalcore.rmsnorm(y + h, self.weight, 1e-5)


def test_export_roundtrip_in_fresh_process(tmp_path):
    m = _Block(48)
    b, s = torch.export.Dim("b", max=64), torch.export.Dim("s", max=256)
    args = (torch.randn(2, 5, 48), torch.randn(2, 5, 48))
    other = (torch.randn(3, 11, 48), torch.randn(3, 11, 48))
    export_roundtrip(
        m,
        args,
        ({0: b, 1: s}, {0: b, 1: s}),
        other,
        tmp_path,
        expect_ops=["metalcore.fused_add_rmsnorm.default", "metalcore.rmsnorm.default"],
    )
