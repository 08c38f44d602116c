"""metalcore.nn.RMSNorm / FusedAddRMSNorm as drop-ins for torch.nn.RMSNorm."""

import io

import pytest
import torch

from metalcore.nn import FusedAddRMSNorm, RMSNorm
from tests.support import TOL
from tests.users_support import OpCounter, needs_transformers

# Allowed error against float64, relative to the magnitude of the result: two roundings of the
# output dtype (the op rounds its float32 result once; gradients add one more for the cancelling
# terms of the RMSNorm backward).
REL = {torch.float32: 2e-6, torch.float16: 2 * 2.0**-11, torch.bfloat16: 2 * 2.0**-8}


def _assert_near(actual, expected64, rel, scale=None):
    scale = expected64.abs().max() if scale is None else scale
    torch.testing.assert_close(actual.double(), expected64, rtol=rel, atol=rel * float(scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [None, 1e-5])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_torch_module_and_float64_forward_and_backward(dtype, eps, affine):
    torch.manual_seed(0)
    ours = RMSNorm(96, eps=eps, elementwise_affine=affine, dtype=dtype)
    theirs = torch.nn.RMSNorm(96, eps=eps, elementwise_affine=affine, dtype=dtype)
    if affine:
        with torch.no_grad():
            ours.weight.normal_()
        theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 96, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with OpCounter() as counter:
        ya = ours(xa)
    assert counter.counts["rmsnorm"] == 1  # the op ran, not the fallback
    yb = theirs(xb)
    torch.testing.assert_close(ya, yb, **TOL[dtype])  # the drop-in: torch's module, same dtype
    # The independent reference: plain float64 math on the same (rounded) inputs.
    x64 = x.double().requires_grad_()
    w64 = ours.weight.detach().double().requires_grad_() if affine else None
    y64 = _rms_float64(x64, OPMATH_EPS[dtype] if eps is None else eps, w64)
    _assert_near(ya, y64.detach(), REL[dtype])
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    y64.backward(g.double())
    _assert_near(xa.grad, x64.grad, REL[dtype])
    if affine:
        # grad_weight sums g * x_hat over 15 rows, whose terms cancel: its error follows the
        # sum of their magnitudes, not the result.
        terms = (g.double() * y64.detach() / w64.detach()).abs().flatten(0, -2).sum(0)
        _assert_near(ours.weight.grad, w64.grad, REL[dtype], scale=terms.max())


def _rms_float64(x, eps, weight=None):
    """Plain float64 RMSNorm over the last dim: the independent reference."""
    x64 = x.double()
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.double()


# eps=None in torch.nn.RMSNorm is the epsilon of the type torch computes in: float32's for
# float16/bfloat16/float32 inputs, float64's for float64 (not the input dtype's own).
OPMATH_EPS = {
    torch.float16: torch.finfo(torch.float32).eps,
    torch.bfloat16: torch.finfo(torch.float32).eps,
    torch.float32: torch.finfo(torch.float32).eps,
    torch.float64: torch.finfo(torch.float64).eps,
}


@pytest.mark.parametrize("dtype", list(OPMATH_EPS))
@pytest.mark.parametrize("value", [1e-2, 1e-4])
def test_eps_none_matches_torch_rmsnorm_in_every_dtype(dtype, value):
    # Rows of small values: the result depends visibly on eps, so a wrong default shows (a
    # bfloat16 row of 0.01s normalises to ~1.0 with float32's eps, to 0.11 with bfloat16's).
    x = torch.full((2, 8), value, dtype=dtype)
    r = torch.full((2, 8), value, dtype=dtype)
    expected = _rms_float64(x, OPMATH_EPS[dtype])
    tol = dict(TOL[dtype])
    for affine in (False, True):
        ours = RMSNorm(8, elementwise_affine=affine, dtype=dtype)
        theirs = torch.nn.RMSNorm(8, elementwise_affine=affine, dtype=dtype)
        with OpCounter() as counter:
            y = ours(x)
        assert counter.counts["rmsnorm"] == 1
        assert y.dtype == dtype
        torch.testing.assert_close(y, theirs(x), **tol)
        torch.testing.assert_close(y.double(), expected, **tol)
        fused = FusedAddRMSNorm(8, elementwise_affine=affine, dtype=dtype)
        with OpCounter() as counter:
            y, h = fused(x, r)
        assert counter.counts["fused_add_rmsnorm"] == 1
        torch.testing.assert_close(y, theirs(x + r), **tol)
        torch.testing.assert_close(y.double(), _rms_float64(x + r, OPMATH_EPS[dtype]), **tol)
    if dtype == torch.bfloat16 and value == 1e-2:
        assert abs(float(y[0, 0]) - 1.0) < 1e-2


def test_integer_and_bool_inputs_raise_our_type_error():
    for dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
        x = torch.ones(2, 8, dtype=dtype)
        with pytest.raises(TypeError, match=r"metalcore.nn.RMSNorm: 'input' must be a floating"):
            RMSNorm(8)(x)
        with pytest.raises(TypeError, match=r"metalcore.nn.RMSNorm: 'input' .* got torch.int64"):
            RMSNorm(8, elementwise_affine=False)(x.long())
        f = torch.ones(2, 8)
        with pytest.raises(TypeError, match=r"FusedAddRMSNorm: 'input' must be a floating"):
            FusedAddRMSNorm(8)(x, f)
        with pytest.raises(TypeError, match=r"FusedAddRMSNorm: 'residual' must be a floating"):
            FusedAddRMSNorm(8)(f, x)
    # Complex inputs are torch's case: they take torch's code, as in torch.nn.RMSNorm.
    z = torch.randn(2, 8, dtype=torch.complex64)
    torch.testing.assert_close(RMSNorm(8)(z), torch.nn.RMSNorm(8)(z))


def test_constructor_parameters_state_dict_and_isinstance_match_torch():
    ours, theirs = RMSNorm(16, eps=1e-6), torch.nn.RMSNorm(16, eps=1e-6)
    assert isinstance(ours, torch.nn.RMSNorm)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    assert ours.normalized_shape == theirs.normalized_shape and ours.eps == theirs.eps
    with torch.no_grad():
        ours.weight.uniform_()
    theirs.load_state_dict(ours.state_dict())  # ours -> torch
    back = RMSNorm(16, eps=1e-6)
    back.load_state_dict(theirs.state_dict())  # torch -> ours
    assert torch.equal(back.weight, ours.weight)
    assert list(RMSNorm(16, elementwise_affine=False).state_dict()) == []
    buf = io.BytesIO()
    torch.save(ours, buf)  # whole-module pickling keeps the class path
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is RMSNorm and torch.equal(loaded.weight, ours.weight)


@needs_transformers
def test_state_dict_interchanges_with_hf_llama_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        hf.weight.normal_()
    ours = RMSNorm(48, eps=1e-5)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 3, 48)
    torch.testing.assert_close(ours(x), hf(x))
    hf2 = LlamaRMSNorm(48, eps=1e-5)
    hf2.load_state_dict(ours.state_dict())
    assert torch.equal(hf2.weight, hf.weight)


def test_multi_dim_normalized_shape_falls_back_to_torch_exactly():
    ours = RMSNorm((4, 8), eps=1e-5)
    theirs = torch.nn.RMSNorm((4, 8), eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 8)
    with OpCounter() as counter:
        y = ours(x)
    assert not counter.counts
    assert torch.equal(y, theirs(x))


def test_mixed_dtypes_and_bad_shapes_behave_like_torch():
    ours = RMSNorm(8)  # float32 weight
    theirs = torch.nn.RMSNorm(8)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    y = ours(x)
    expected = theirs(x)
    assert y.dtype == expected.dtype
    assert torch.equal(y, expected)
    with pytest.raises(RuntimeError):
        RMSNorm(8, elementwise_affine=False)(torch.randn(2, 9))
    with pytest.raises(RuntimeError):
        torch.nn.RMSNorm(8, elementwise_affine=False)(torch.randn(2, 9))


def test_meta_device_and_compile():
    m = RMSNorm(32, device="meta")
    assert m(torch.empty(4, 32, device="meta")).shape == (4, 32)
    real = RMSNorm(32)
    compiled = torch.compile(real, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 32)
    torch.testing.assert_close(compiled(x), real(x))


def test_fused_add_rmsnorm_module():
    torch.manual_seed(0)
    m = FusedAddRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        m.weight.normal_()
    ref = torch.nn.RMSNorm(64, eps=1e-6)
    ref.load_state_dict(m.state_dict())
    assert isinstance(m, torch.nn.RMSNorm)
    x, r = torch.randn(2, 7, 64, requires_grad=True), torch.randn(2, 7, 64, requires_grad=True)
    x2, r2 = (t.detach().clone().requires_grad_() for t in (x, r))
    with OpCounter() as counter:
        y, h = m(x, r)
    assert counter.counts["fused_add_rmsnorm"] == 1
    h_ref = x2 + r2
    y_ref = ref(h_ref)
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(y, y_ref)
    (y.sum() + (h * 2).sum()).backward()
    (y_ref.sum() + (h_ref * 2).sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.grad, r2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    # Fallback (residual in another dtype) computes the same thing with torch ops.
    y3, h3 = m(x.detach(), r.detach().double())
    assert h3.dtype == torch.float64
