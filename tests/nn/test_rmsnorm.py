"""metalcore.nn.RMSNorm / FusedAddRMSNorm as drop-ins for torch.nn.RMSNorm."""

import io

import pytest
import torch
import torch.nn.functional as F

import metalcore
from metalcore.nn import FusedAddRMSNorm, RMSNorm
from tests.support import TOL
from tests.users_support import OpCounter, needs_transformers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [None, 1e-5])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_torch_module_forward_and_backward(dtype, eps, affine):
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
    torch.testing.assert_close(ya, yb, **TOL[dtype])
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    tol = dict(TOL[dtype]) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    if affine:
        # grad_weight sums over 15 rows: a little more float32 reassociation than one row.
        wtol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-1, atol=1e-1)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **wtol)


def test_eps_none_is_finfo_eps_of_input_dtype():
    # Rows of tiny values: the result depends visibly on eps, so a wrong default shows.
    x = torch.full((2, 8), 1e-4)
    m = RMSNorm(8, elementwise_affine=False)
    torch.testing.assert_close(m(x), F.rms_norm(x, (8,), None, None), rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x), metalcore.rmsnorm(x, None, torch.finfo(torch.float32).eps))


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
