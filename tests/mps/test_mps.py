"""The Metal kernels on a real Apple GPU: the cases of tests/metal (run there through msim) on
MPS tensors through the user-facing ops, plus torch.compile and export on MPS. Skipped off-Mac;
``METALCORE_REQUIRE_MPS=1`` (the macOS CI job) turns the skip into a failure."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import metalcore
from tests.metal import test_activation as act
from tests.metal import test_adamw as adamw
from tests.metal import test_rmsnorm as rms
from tests.metal import test_rope as rope
from tests.support import FLOAT_DTYPES, LAYOUTS

HAVE_MPS = torch.backends.mps.is_available()
if not HAVE_MPS and os.environ.get("METALCORE_REQUIRE_MPS") == "1":
    raise RuntimeError("METALCORE_REQUIRE_MPS=1 but torch.backends.mps is not available")
pytestmark = pytest.mark.skipif(not HAVE_MPS, reason="needs an Apple GPU (MPS)")

ops = torch.ops.metalcore


@given(
    lead=rms.lead_shapes,
    n=rms.row_sizes,
    dtype=st.sampled_from(FLOAT_DTYPES),
    layout=st.sampled_from(LAYOUTS),
    with_weight=st.booleans(),
    fused=st.booleans(),
)
def test_rmsnorm_forward(lead, n, dtype, layout, with_weight, fused):
    rms.check_forward(ops, "mps", lead, n, dtype, layout, with_weight, fused)


@given(
    lead=rms.lead_shapes,
    n=rms.row_sizes,
    dtype=st.sampled_from(FLOAT_DTYPES),
    layout=st.sampled_from(LAYOUTS),
    with_weight=st.booleans(),
    grad_res=st.booleans(),
)
def test_rmsnorm_backward(lead, n, dtype, layout, with_weight, grad_res):
    rms.check_backward(ops, "mps", lead, n, dtype, layout, with_weight, grad_res)


# The real pipeline limit decides the variant here: cover both sides of the 4096 cutoff.
@pytest.mark.parametrize("n", [4095, 4096, 4097, 4100, 8191, 8192, 16384 + 3])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rmsnorm_variant_cutoffs(n, dtype):
    for layout in ("offset", "contiguous"):  # scalar and (for n % 4 == 0) vec4 kernels
        rms.check_forward(ops, "mps", (3,), n, dtype, layout, True, True)
        rms.check_backward(ops, "mps", (9,), n, dtype, layout, True, True)


def test_rmsnorm_empty_and_special_values():
    rms.check_empty_and_special(ops, "mps")


@given(
    kind=st.sampled_from(act.KINDS),
    shape=act.shapes,
    dtype=st.sampled_from(FLOAT_DTYPES),
    layout=st.sampled_from(LAYOUTS),
)
def test_activation_forward_backward(kind, shape, dtype, layout):
    act.check_activation(ops, "mps", kind, shape, dtype, layout)


def test_activation_empty_and_special_values():
    act.check_empty_and_special(ops, "mps")


@given(c=rope.cases())
def test_rope_forward_backward(c):
    rope.check_rope(ops, "mps", c)


def test_rope_empty_and_special_values():
    rope.check_empty_and_special(ops, "mps")


@given(
    sizes=st.lists(st.sampled_from(adamw.SIZES + [1 << 20]), min_size=1, max_size=5),
    pair=st.sampled_from(adamw.DTYPE_PAIRS),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
)
def test_adamw_matches_cpu_and_reference(sizes, pair, amsgrad, maximize):
    adamw.check_adamw(ops, "mps", [(n, *pair) for n in sizes], amsgrad, maximize)


def test_adamw_more_tensors_than_one_launch():
    specs = [(n % 50 + (n == 3) * 4096, torch.float32, torch.float32) for n in range(150)]
    adamw.check_adamw(ops, "mps", specs, amsgrad=True, maximize=False, steps=2)


def test_training_step_on_mps():
    # Autograd routes the backward ops to the MPS kernels too; gradients match CPU.
    x = torch.randn(4, 16, 96)
    w = torch.randn(96)
    grads = []
    for device in ("cpu", "mps"):
        leaves = [t.to(device).requires_grad_() for t in (x, w)]
        y, h = metalcore.fused_add_rmsnorm(leaves[0], leaves[0] * 2, leaves[1])
        out = metalcore.swiglu(metalcore.rmsnorm(y, leaves[1]), metalcore.gelu(h, "tanh"))
        out.sum().backward()
        grads.append([t.grad.cpu() for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)


def test_compile_fullgraph_on_mps():
    def block(x, r, w):
        y, h = ops.fused_add_rmsnorm(x, r, w, 1e-6)
        return ops.swiglu(ops.rmsnorm(y, w, 1e-6), ops.silu(h))

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    for rows in (5, 9, 17):
        args = [torch.randn(rows, 3, 64, device="mps"), torch.randn(rows, 3, 64, device="mps")]
        args.append(torch.randn(64, device="mps"))
        torch.testing.assert_close(compiled(*args), block(*args))


def test_export_roundtrip_on_mps(tmp_path):
    from tests.ops.test_rmsnorm import _Block
    from tests.support import export_roundtrip

    m = _Block(48).to("mps")
    b, s = torch.export.Dim("b", max=64), torch.export.Dim("s", max=256)
    args = (torch.randn(2, 5, 48, device="mps"), torch.randn(2, 5, 48, device="mps"))
    other = (torch.randn(3, 11, 48, device="mps"), torch.randn(3, 11, 48, device="mps"))
    export_roundtrip(
        m,
        args,
        ({0: b, 1: s}, {0: b, 1: s}),
        other,
        tmp_path,
        expect_ops=["metalcore.fused_add_rmsnorm.default", "metalcore.rmsnorm.default"],
    )
