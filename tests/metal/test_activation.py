"""silu, gelu (erf/tanh) and swiglu through the Metal launch layer and kernels (msim on CPU
tensors), forward and backward, against the CPU kernels and float64 references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from metalcore.testing import reference as ref
from tests.support import FLOAT_DTYPES, LAYOUTS, assert_close, make_layout

cpu = torch.ops.metalcore

# Tails below a simdgroup, not multiples of the 4 elements per thread, and around the
# 1024-element block of one threadgroup.
shapes = st.sampled_from([(1,), (3,), (31,), (5, 7), (1023,), (1024,), (2, 513), (3, 5, 137)])
KINDS = ["silu", "gelu_none", "gelu_tanh", "swiglu"]


def _reference(kind, args64):
    if kind == "silu":
        return ref.silu(args64[0])
    if kind == "swiglu":
        return ref.swiglu(*args64)
    return ref.gelu(args64[0], kind.split("_")[1])


def run(ops, kind, args, grad=None):
    """Forward (grad None) or backward of `kind` in namespace `ops`."""
    if kind == "silu":
        return ops.silu(*args) if grad is None else ops.silu_backward(grad, *args)
    if kind == "swiglu":
        return ops.swiglu(*args) if grad is None else ops.swiglu_backward(grad, *args)
    approx = kind.split("_")[1]
    if grad is None:
        return ops.gelu(args[0], approx)
    return ops.gelu_backward(grad, args[0], approx)


def check_activation(ops, device, kind, shape, dtype, layout):
    n_in = 2 if kind == "swiglu" else 1
    base = [torch.randn(shape, dtype=dtype) * 3 for _ in range(n_in)]
    args = [make_layout(t, layout, device) for t in base]
    g = make_layout(torch.randn(shape, dtype=dtype), layout, device)

    y = run(ops, kind, args)
    assert y.shape == args[0].shape and y.dtype == dtype and y.is_contiguous()
    assert_close(y.cpu(), _reference(kind, [t.double() for t in base]))
    assert_close(y.cpu(), run(cpu, kind, base))

    grads = run(ops, kind, args, g)
    grads = grads if isinstance(grads, tuple) else (grads,)
    leaves = [t.double().requires_grad_() for t in base]
    _reference_fn = {
        "silu": lambda a: a * torch.sigmoid(a),
        "gelu_none": lambda a: torch.nn.functional.gelu(a),
        "gelu_tanh": lambda a: torch.nn.functional.gelu(a, approximate="tanh"),
        "swiglu": lambda a, b: a * torch.sigmoid(a) * b,
    }[kind]
    _reference_fn(*leaves).backward(g.cpu().double())
    for got, leaf in zip(grads, leaves):
        assert_close(
            got.cpu(), leaf.grad, dtype, rtol=2 * 1.6e-2 if dtype == torch.bfloat16 else None
        )


@given(
    kind=st.sampled_from(KINDS),
    shape=shapes,
    dtype=st.sampled_from(FLOAT_DTYPES),
    layout=st.sampled_from(LAYOUTS),
)
def test_forward_backward(mops, kind, shape, dtype, layout):
    check_activation(mops, "cpu", kind, shape, dtype, layout)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_kernel(mops, kind, dtype):
    # One deterministic pass over every (op, dtype) pair: each host name is dispatched.
    check_activation(mops, "cpu", kind, (2, 1029), dtype, "offset")


@pytest.mark.parametrize("limit", [32, 64])
def test_small_threadgroup_limit(mops, max_threads, limit):
    # A pipeline limited below 256 threads: the launch layer shrinks the block and grid to match.
    max_threads(limit)
    check_activation(mops, "cpu", "swiglu", (777,), torch.float32, "contiguous")
    check_activation(mops, "cpu", "gelu_none", (130,), torch.float16, "strided")


def check_empty_and_special(ops, device):
    for kind in KINDS:
        n_in = 2 if kind == "swiglu" else 1
        empty = [torch.randn(0, 4, device=device) for _ in range(n_in)]
        assert run(ops, kind, empty).shape == (0, 4)
        x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30, 3.0])
        args = [x.clone() for _ in range(n_in)]
        g = torch.ones_like(x)
        y = run(ops, kind, [a.to(device) for a in args]).cpu()
        torch.testing.assert_close(y, run(cpu, kind, args), equal_nan=True)
        dy = run(ops, kind, [a.to(device) for a in args], g.to(device))
        want = run(cpu, kind, args, g)
        for a, b in zip(
            dy if isinstance(dy, tuple) else (dy,), want if isinstance(want, tuple) else (want,)
        ):
            torch.testing.assert_close(a.cpu(), b, equal_nan=True)


def test_empty_and_special_values(mops):
    check_empty_and_special(mops, "cpu")


def test_bad_inputs(mops):
    with pytest.raises(TypeError, match=r"metalcore\.silu: 'input' must be float16, bfloat16 or"):
        mops.silu(torch.randn(4, dtype=torch.float64))
    with pytest.raises(
        ValueError, match=r"metalcore\.gelu: 'approximate' must be 'none' or 'tanh'"
    ):
        mops.gelu(torch.randn(4), "fast")
    with pytest.raises(ValueError, match=r"metalcore\.swiglu: 'up' must have the same shape"):
        mops.swiglu(torch.randn(4), torch.randn(5))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_negative_tail_keeps_relative_accuracy(mops, approximate):
    x = torch.linspace(-9.0, -3.0, 601)
    g = torch.ones_like(x)
    y, y_ref = mops.gelu(x, approximate).double(), ref.gelu(x.double(), approximate)
    d = mops.gelu_backward(g, x, approximate).double()
    d_ref = ref.gelu_backward(g.double(), x.double(), approximate)
    assert ((y - y_ref) / y_ref).abs().max() < 1e-5
    assert ((d - d_ref) / d_ref).abs().max() < 1e-5
