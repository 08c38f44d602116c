"""Bugs the reliability harness found, each pinned by the smallest input that showed it."""

import pytest
import torch

from metalcore.testing import reference as ref

ops = torch.ops.metalcore


def test_gelu_tanh_backward_is_finite_for_huge_inputs():
    # x^2 overflowed float32 for |x| > 1.8e19 and 0 * inf made the gradient NaN; the derivative
    # is exactly 1 (x > 0) or 0 (x < 0) there.
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.tensor([1e20, -1e20, 3e38, -3e38, 5.0, -5.0], dtype=dtype)
        g = torch.ones_like(x)
        got = ops.gelu_backward(g, x, "tanh")
        torch.testing.assert_close(got, ref.gelu_backward(g, x, "tanh").to(dtype))
        assert torch.equal(got[:4], torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=dtype))


def test_swiglu_backward_does_not_overflow_through_grad_times_up():
    # grad_gate = g * silu'(gate) * up: multiplying g by up first overflowed float32 to inf
    # although the gradient (silu' <= 1.1) is finite.
    g = torch.tensor([1e20, 3e38], dtype=torch.float32)
    gate = torch.tensor([-3.0, -3.0], dtype=torch.float32)
    up = torch.tensor([1e19, 2.0], dtype=torch.float32)
    grad_gate, _ = ops.swiglu_backward(g, gate, up)
    expected, _ = ref.swiglu_backward(g, gate, up)
    assert torch.isfinite(grad_gate).all(), grad_gate
    torch.testing.assert_close(grad_gate, expected.float())


def test_rmsnorm_grad_weight_is_independent_of_thread_count():
    # grad_weight summed per-thread partials, so its last bits changed with set_num_threads.
    x = torch.randn(129, 1024, dtype=torch.float16)
    g, w = torch.randn_like(x), torch.randn(1024, dtype=torch.float16)
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
