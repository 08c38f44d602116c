"""Bugs the reliability harness found, each pinned by the smallest input that showed it, on
every device that runs the op."""

import pytest
import torch

from metalcore.testing import reference as ref
from tests.support import runs_op

ops = torch.ops.metalcore


def test_gelu_tanh_backward_is_finite_for_huge_inputs(device):
    # x^2 overflowed float32 for |x| > 1.8e19 and 0 * inf made the gradient NaN; the derivative
    # is exactly 1 (x > 0) or 0 (x < 0) there.
    runs_op(device, "gelu_backward")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.tensor([1e20, -1e20, 3e38, -3e38, 5.0, -5.0], dtype=dtype)
        g = torch.ones_like(x)
        got = device.ops.gelu_backward(g.to(device.device), x.to(device.device), "tanh").cpu()
        torch.testing.assert_close(got, ref.gelu_backward(g, x, "tanh").to(dtype))
        assert torch.equal(got[:4], torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=dtype))


@pytest.mark.parametrize(
    "g,gate,up",
    [
        # grad_gate = g * silu'(gate) * up: multiplying g by up first overflowed float32 to inf
        # although the gradient (silu' <= 1.1) is finite.
        ([1e20, 3e38], [-3.0, -3.0], [1e19, 2.0]),
        # g * gate and g * up overflow float32 here (the Metal and CUDA kernels formed them).
        ([1e37, 1e37], [-40.0, 2.0], [1.0, 30.0]),
    ],
)
def test_swiglu_backward_has_no_overflowing_intermediates(device, g, gate, up):
    runs_op(device, "swiglu_backward")
    g, gate, up = (torch.tensor(v, dtype=torch.float32) for v in (g, gate, up))
    on = device.device
    got = [t.cpu() for t in device.ops.swiglu_backward(g.to(on), gate.to(on), up.to(on))]
    for out, expected in zip(got, ref.swiglu_backward(g, gate, up)):
        assert torch.isfinite(out).all(), out
        torch.testing.assert_close(out, expected.float())


def test_rmsnorm_grad_weight_is_independent_of_thread_count():
    # grad_weight summed per-thread partials, so its last bits changed with set_num_threads.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(129, 1024, generator=gen).to(torch.float16)
    g = torch.randn(129, 1024, generator=gen).to(torch.float16)
    w = torch.randn(1024, generator=gen).to(torch.float16)
    prev = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(ops.fused_add_rmsnorm_backward(g, g, x, w, 0.5)[1])
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(results[0].view(torch.int16), r.view(torch.int16)) for r in results)


def test_fused_add_rmsnorm_backward_errors_name_residual_out():
    # The messages named 'input', an argument this op does not have.
    with pytest.raises(TypeError, match=r"'residual_out' must be float16"):
        ops.fused_add_rmsnorm_backward(
            torch.ones(2, 4), None, torch.ones(2, 4, dtype=torch.int32), None, 1e-6
        )
    with pytest.raises(ValueError, match=r"\(the last dim of 'residual_out'\)"):
        ops.fused_add_rmsnorm_backward(
            torch.ones(2, 4), None, torch.ones(2, 4), torch.ones(3), 1e-6
        )
