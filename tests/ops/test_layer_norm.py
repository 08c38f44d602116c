"""layer_norm and fused_add_layer_norm beyond the op contract (tests/ops/test_contract.py runs
numerics, gradients, gradcheck, opcheck, compile, export and bad inputs for every op from its
spec): the same results as torch.nn.functional.layer_norm, numerical stability on rows whose mean
is large against their spread, multi-dim normalized_shape through metalcore.layer_norm, the
residual sum rounded once, the Python API's errors, double backward."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import metalcore
from metalcore.testing import backends as bk
from metalcore.testing.op_specs import SPECS, HypothesisDrawer, tolerance
from tests.support import runs_op, seeded

ops = torch.ops.metalcore
LN_C = 4  # the layer_norm spec's opmath units (metalcore/testing/op_specs.py)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [7, 768, 4099])
def test_matches_torch_layer_norm(dtype, n):
    x = seeded(3, 5, n, dtype=dtype, seed=1, scale=3.0)
    w, b = seeded(n, dtype=dtype, seed=2), seeded(n, dtype=dtype, seed=3)
    y = metalcore.layer_norm(x, (n,), w, b, eps=1e-5)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    # PyTorch's own layer_norm in float64 is an independent reference.
    expected = F.layer_norm(x.double(), (n,), w.double(), b.double(), 1e-5)
    scale = (expected - b.double()).abs().median() + b.double().abs()
    tol = tolerance(dtype, LN_C, scale=scale)
    bk.compare(y, expected, tol, f"layer_norm vs F.layer_norm in float64 ({dtype}, n={n})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 4096])
def test_large_mean_small_spread_within_twice_torch_error(dtype, n):
    """Rows of 300 +- 0.01: E[x^2] - E[x]^2 would lose every digit of the variance in float32.
    The error against float64 must stay within twice torch's own error in that dtype (plus one
    rounding of the output, so a torch that happens to round luckily cannot fail us)."""
    g = torch.Generator().manual_seed(0)
    x64 = 300.0 + 0.01 * torch.randn(16, n, generator=g, dtype=torch.float64)
    x = x64.to(dtype)
    w = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    exact = F.layer_norm(x.double(), (n,), w.double(), b.double(), 1e-5)
    ours = (metalcore.layer_norm(x, n, w, b, 1e-5).double() - exact).abs().max().item()
    theirs = (F.layer_norm(x, (n,), w, b, 1e-5).double() - exact).abs().max().item()
    one_rounding = torch.finfo(dtype).eps * exact.abs().max().item()
    assert ours <= 2 * theirs + one_rounding, (ours, theirs)
    # And the backward: grads of input, weight and bias.
    xg = x.detach().requires_grad_()
    go = torch.randn(16, n, generator=g, dtype=torch.float64).to(dtype)
    (dx,) = torch.autograd.grad(metalcore.layer_norm(xg, n, w, b), (xg,), go)
    x64g = x.double().requires_grad_()
    (dx_exact,) = torch.autograd.grad(
        F.layer_norm(x64g, (n,), w.double(), b.double(), 1e-5), (x64g,), go.double()
    )
    xt = x.detach().requires_grad_()
    (dx_torch,) = torch.autograd.grad(F.layer_norm(xt, (n,), w, b, 1e-5), (xt,), go)
    ours = (dx.double() - dx_exact).abs().max().item()
    theirs = (dx_torch.double() - dx_exact).abs().max().item()
    one_rounding = torch.finfo(dtype).eps * dx_exact.abs().max().item()
    assert ours <= 2 * theirs + one_rounding, (ours, theirs)


def test_multi_dim_normalized_shape_matches_torch():
    x = seeded(2, 3, 4, 5, dtype=torch.float64, seed=1).requires_grad_()
    w = seeded(4, 5, dtype=torch.float64, seed=2).requires_grad_()
    b = seeded(4, 5, dtype=torch.float64, seed=3).requires_grad_()
    go = seeded(2, 3, 4, 5, dtype=torch.float64, seed=4)
    y = metalcore.layer_norm(x, (4, 5), w, b, 1e-5)
    grads = torch.autograd.grad(y, (x, w, b), go)
    y_t = F.layer_norm(x, (4, 5), w, b, 1e-5)
    grads_t = torch.autograd.grad(y_t, (x, w, b), go)
    torch.testing.assert_close(y, y_t)
    for a, e in zip(grads, grads_t):
        torch.testing.assert_close(a, e)
    out, h = metalcore.fused_add_layer_norm(x, x, (4, 5), w, b)
    torch.testing.assert_close(out, F.layer_norm(x + x, (4, 5), w, b))
    torch.testing.assert_close(h, x + x)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (
            lambda x: metalcore.layer_norm(x, (9,)),
            ValueError,
            r"'normalized_shape' \[9\] must equal",
        ),
        (lambda x: metalcore.layer_norm(x, (), None), ValueError, "at least one dim"),
        (lambda x: metalcore.layer_norm(x, "8"), TypeError, "'normalized_shape' must be an int"),
        (
            lambda x: metalcore.layer_norm(x, (3, 8), torch.ones(8)),
            ValueError,
            r"metalcore\.layer_norm: 'weight' must have shape \[3, 8\]",
        ),
        (
            lambda x: metalcore.layer_norm(x.int(), 8),
            TypeError,
            r"metalcore\.layer_norm: 'input' must be float16, bfloat16, float32 or float64",
        ),
        (
            lambda x: metalcore.fused_add_layer_norm(x, x, 8, None, torch.ones(7)),
            ValueError,
            r"metalcore\.fused_add_layer_norm: 'bias' must have shape \[8\]",
        ),
    ],
)
def test_python_api_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 3, 8))


@given(data=st.data())
def test_residual_sum_is_rounded_once(device, data):
    """fused_add_layer_norm's second output is input + residual in the input dtype bit for bit."""
    runs_op(device, "fused_add_layer_norm")
    spec = SPECS["fused_add_layer_norm"]
    sample = spec.draw(HypothesisDrawer(data, device.limits))
    if device.supports(sample) is not None:
        return
    args, _ = sample.materialize(device.device)
    _, h = device.ops.fused_add_layer_norm(*args)
    x, r = (a.values for a in sample.args[:2])
    torch.testing.assert_close(h.cpu(), x + r, rtol=0, atol=0, equal_nan=True)


def test_constant_rows_normalise_to_the_bias():
    # var = 0: every element is its mean exactly, so y = bias (no 0 * huge garbage).
    x = torch.full((4, 37), 0.1, dtype=torch.float32)
    b = seeded(37, seed=1)
    y = metalcore.layer_norm(x, 37, torch.ones(37), b, 1e-5)
    torch.testing.assert_close(y, b.expand(4, 37), rtol=0, atol=0)


def test_training_step_through_module_graph():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32, requires_grad=True)
    w = torch.ones(32, requires_grad=True)
    b = torch.zeros(32, requires_grad=True)
    lin = torch.nn.Linear(32, 32)
    y, h = metalcore.fused_add_layer_norm(lin(x), x, 32, w, b)
    (metalcore.layer_norm(y, 32, w, b) * h).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (x, w, b, lin.weight))


def test_double_backward_is_a_clear_error():
    x = seeded(3, 8, dtype=torch.float64).requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((ops.layer_norm(x, None, None, 1e-5) ** 2).sum(), x, create_graph=True)


def test_module_is_a_drop_in_for_torch_layer_norm():
    torch.manual_seed(0)
    ref_mod = torch.nn.LayerNorm((4, 8), eps=1e-6)
    with torch.no_grad():
        ref_mod.weight.normal_(1.0, 0.3)
        ref_mod.bias.normal_(0.0, 0.3)
    mod = metalcore.nn.LayerNorm((4, 8), eps=1e-6)
    assert isinstance(mod, torch.nn.LayerNorm)
    mod.load_state_dict(ref_mod.state_dict())
    assert mod.state_dict().keys() == ref_mod.state_dict().keys()
    x = torch.randn(3, 4, 8, requires_grad=True)
    y, y_ref = mod(x), ref_mod(x)
    # (4, 8) is normalised as one flattened row: a view of the op's output.
    assert y.grad_fn.next_functions[0][0].name() == "MetalcoreLayerNormBackward"
    torch.testing.assert_close(y, y_ref)
    g, g_ref = (
        torch.autograd.grad(y.sum(), mod.parameters()),
        torch.autograd.grad(y_ref.sum(), ref_mod.parameters()),
    )
    for a, e in zip(g, g_ref):
        torch.testing.assert_close(a, e)
    # No bias, no affine, and an input the op does not cover (torch's own path and error).
    for kw in ({"bias": False}, {"elementwise_affine": False}):
        m, r = metalcore.nn.LayerNorm(8, **kw), torch.nn.LayerNorm(8, **kw)
        torch.testing.assert_close(m(x), r(x))
    with pytest.raises(RuntimeError):
        metalcore.nn.LayerNorm(8)(torch.ones(2, 8, dtype=torch.int64))
    fused = metalcore.nn.FusedAddLayerNorm(8)
    out, h = fused(x, x)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x + x, (8,)))
