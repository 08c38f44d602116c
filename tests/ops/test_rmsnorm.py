"""rmsnorm and fused_add_rmsnorm beyond the op contract (tests/ops/test_contract.py runs numerics,
gradients, gradcheck, opcheck, compile, export and bad inputs for every op from its spec): the
same results as torch.nn.functional.rms_norm and Hugging Face's LlamaRMSNorm, the residual sum
rounded exactly once on every device, gradients through a module graph, double backward."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import metalcore
from metalcore.testing import backends as bk
from metalcore.testing import reference as ref
from metalcore.testing.op_specs import (
    SPECS,
    HypothesisDrawer,
    Sample,
    TensorArg,
    Tolerance,
    tolerance,
)
from tests.support import seeded

ops = torch.ops.metalcore
RMS_C = 3  # the rmsnorm spec's opmath units (metalcore/testing/op_specs.py)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("eps_ratio,scale", [(0.0, 1e-3), (1e-6, 1.0), (1e-2, 1e3), (1.0, 1e-3)])
def test_matches_torch_rms_norm_and_hf_llama(dtype, eps_ratio, scale):
    # eps against the rows' mean square across decades, at magnitudes across decades: where eps
    # matters, a kernel that drops or double-counts it is off by up to 30%.
    x = seeded(2, 17, 4096, dtype=dtype, seed=1, scale=scale)
    w = seeded(4096, dtype=dtype, seed=2)
    eps = eps_ratio * float(x.double().pow(2).mean())
    y = metalcore.rmsnorm(x, w, eps)
    tol = tolerance(dtype, RMS_C, per_row=True)
    # PyTorch's own rms_norm in float64 is an independent reference.
    expected = F.rms_norm(x.double(), (4096,), w.double(), eps)
    bk.compare(y, expected, tol, f"rmsnorm vs F.rms_norm in float64 ({dtype}, eps={eps:g})")
    if dtype == torch.float64:
        return  # LlamaRMSNorm computes in float32 whatever the input dtype
    # Hugging Face rounds to the input dtype before the weight multiply: one more rounding.
    hf = ref.hf_llama_rmsnorm(x, w, eps)
    two_roundings = Tolerance(2 * tol.rtol, 2 * tol.atol, per_row=True)
    bk.compare(y, hf.double(), two_roundings, f"rmsnorm vs LlamaRMSNorm ({dtype})")


@pytest.mark.parametrize("n", [4099, 65536])
def test_constant_rows_sum_without_drift(device, n):
    """Rows of equal values are the worst case for a running sum (every rounding leans the same
    way): a per-lane sum over a whole row drifted 6e-6 at 65536 elements, 50x the spec's
    tolerance, where random rows stayed inside it."""
    if device.max_numel is not None and 2 * n > device.max_numel:
        pytest.skip(f"{device.name} limits inputs to {device.max_numel} elements")
    x = torch.tensor([[0.7313], [1.2345]], dtype=torch.float32).expand(2, n).contiguous()
    g = torch.ones_like(x)
    eps = 5e-7
    bk.check_sample(SPECS["rmsnorm"], device, Sample([TensorArg(x), None, eps]))
    backward = Sample([TensorArg(g), TensorArg(x), None, eps])
    bk.check_sample(SPECS["rmsnorm_backward"], device, backward)


@given(data=st.data())
def test_residual_sum_is_rounded_once(device, data):
    """fused_add_rmsnorm's second output is input + residual in the input dtype bit for bit, as
    the unfused add, on every device (the spec's tolerance would admit an ulp)."""
    spec = SPECS["fused_add_rmsnorm"]
    sample = spec.draw(HypothesisDrawer(data, device.limits))
    if device.supports(sample) is not None:
        return
    args, _ = sample.materialize(device.device)
    _, h = device.ops.fused_add_rmsnorm(*args)
    x, r = (a.values for a in sample.args[:2])
    torch.testing.assert_close(h.cpu(), x + r, rtol=0, atol=0, equal_nan=True)


def test_training_step_through_module_graph():
    # Gradients reach every leaf through a small pre-norm block (no silently dropped grads).
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32, requires_grad=True)
    w = torch.ones(32, requires_grad=True)
    lin = torch.nn.Linear(32, 32)
    y, h = metalcore.fused_add_rmsnorm(lin(x), x, w)
    (metalcore.rmsnorm(y, w) + h).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (x, w, lin.weight))


def test_double_backward_is_a_clear_error():
    x = seeded(3, 8, dtype=torch.float64).requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(ops.rmsnorm(x, None, 1e-6).sum(), x, create_graph=True)
