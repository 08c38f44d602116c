"""Attention beyond the op contract: agreement with torch's scaled_dot_product_attention (float64
and the flash-attn error rule in float16/bfloat16), the F.sdpa drop-in wrapper, windows against
explicit masks, GQA decode over a long cache, and memory linear in the sequence length."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import metalcore
from metalcore import functional as mf
from metalcore.testing import reference as ref


def _qkv(b, hq, hkv, lq, lk, d, dtype=torch.float64, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, lk, dv or d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def _grads(fn, q, k, v, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, grad))


@pytest.mark.parametrize(
    "b,hq,hkv,lq,lk,causal",
    [
        (2, 4, 4, 17, 17, True),
        (1, 4, 2, 33, 70, False),
        (1, 8, 2, 70, 33, True),  # top-left causal with Lq > Lk
        (2, 8, 1, 20, 150, True),  # MQA, top-left causal with Lq < Lk
        (1, 8, 8, 1, 129, False),
    ],
)
def test_matches_torch_sdpa_in_float64(b, hq, hkv, lq, lk, causal):
    q, k, v = _qkv(b, hq, hkv, lq, lk, 16)
    grad = torch.randn(b, hq, lq, 16, dtype=torch.float64)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv)

    def ours(q, k, v):
        return metalcore.scaled_dot_product_attention(
            q, k, v, is_causal=causal, enable_gqa=hq != hkv
        )

    for got, want in zip(_grads(ours, q, k, v, grad), _grads(sdpa, q, k, v, grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("shape", ["full", "b11k", "1hqk", "qk"])
def test_masks_match_torch_sdpa(kind, shape):
    b, hq, lq, lk = 2, 4, 9, 21
    q, k, v = _qkv(b, hq, 2, lq, lk, 8, seed=1)
    mshape = {"full": (b, hq, lq, lk), "b11k": (b, 1, 1, lk), "1hqk": (1, hq, lq, lk)}.get(
        shape, (lq, lk)
    )
    g = torch.Generator().manual_seed(2)
    keep = torch.rand(mshape, generator=g) < 0.6
    keep[..., 0] = True  # F.sdpa gives NaN for a row that sees nothing; tested separately
    mask = keep if kind == "bool" else torch.randn(mshape, generator=g, dtype=torch.float64)
    got = metalcore.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_rows_that_see_no_key_give_zero_and_infinite_lse():
    q, k, v = _qkv(1, 2, 2, 4, 6, 8, seed=3)
    keep = torch.ones(4, 6, dtype=torch.bool)
    keep[2] = False
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = mf.attention(q, k, v, keep)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.isinf(lse[:, :, 2]).all() and (lse[:, :, 2] > 0).all()
    (out.sum() + lse[:, :, [0, 1, 3]].sum()).backward()
    assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


@pytest.mark.parametrize("lq,lk,window", [(9, 30, (3, 0)), (30, 9, (-1, 0)), (12, 12, (2, 2))])
def test_windows_are_bottom_right_masks(lq, lk, window):
    q, k, v = _qkv(1, 2, 1, lq, lk, 8, seed=4)
    out, lse = mf.attention(q, k, v, window_left=window[0], window_right=window[1])
    vis = ref.attention_visibility(lq, lk, False, *window)
    want, want_lse = ref.attention(q, k, v, vis)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-12)


def _max_err(got, want):
    return (got.double() - want.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "hq,hkv,lq,lk,causal", [(4, 4, 113, 203, False), (8, 2, 128, 217, True), (4, 1, 239, 239, True)]
)
def test_flash_attn_error_rule(dtype, hq, hkv, lq, lk, causal):
    """flash-attn's criterion: the error of out, dq, dk and dv against float64 is at most twice
    PyTorch's own (its math path run in the same dtype), plus rounding noise."""
    q, k, v = _qkv(1, hq, hkv, lq, lk, 64, dtype=dtype, seed=5)
    grad = torch.randn(1, hq, lq, 64, dtype=torch.float64).to(dtype)

    def sdpa(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    def ours(q, k, v):
        return metalcore.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    exact = _grads(sdpa, q.double(), k.double(), v.double(), grad.double())
    torch_low = _grads(sdpa, q, k, v, grad)
    got = _grads(ours, q, k, v, grad)
    noise = torch.finfo(dtype).eps
    for name, g, t, e in zip(("out", "dq", "dk", "dv"), got, torch_low, exact):
        ours_err, torch_err = _max_err(g, e), _max_err(t, e)
        bound = 2 * torch_err + 2 * noise * e.abs().max().item()
        assert ours_err <= bound, f"{name}: {ours_err:.3g} > 2 x torch's {torch_err:.3g}"


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gqa_decode_over_a_long_cache(group):
    """One query per head over 8192 cached keys (the KV head's query heads share one pass)."""
    hkv = 2
    q, k, v = _qkv(1, hkv * group, hkv, 1, 8192, 64, dtype=torch.float32, seed=6)
    out, lse = mf.attention(q, k, v, window_left=-1, window_right=0)
    want, want_lse = ref.attention(q, k, v)
    torch.testing.assert_close(out, want.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, want_lse.float(), rtol=1e-6, atol=1e-5)


def test_wrapper_takes_every_keyword_of_torch_sdpa():
    q, k, v = _qkv(2, 4, 2, 5, 7, 8, dtype=torch.float32, seed=7)
    mask = torch.rand(5, 7) < 0.8
    mask[:, 0] = True
    kwargs = dict(attn_mask=mask, dropout_p=0.0, is_causal=False, scale=0.3, enable_gqa=True)
    got = metalcore.scaled_dot_product_attention(query=q, key=k, value=v, **kwargs)
    want = F.scaled_dot_product_attention(query=q, key=k, value=v, **kwargs)
    torch.testing.assert_close(got, want)


def test_wrapper_falls_back_to_torch_with_a_warning_once():
    q, k, v = _qkv(1, 2, 2, 5, 5, 8, dtype=torch.float32, seed=8)
    mf._sdpa_warned.clear()
    with pytest.warns(UserWarning, match=r"dropout_p > 0.*calling torch\.nn\.functional"):
        torch.manual_seed(0)
        got = metalcore.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, dropout_p=0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: no warning
        metalcore.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    # 3-D inputs (no head dim) are F.sdpa's too.
    with pytest.warns(UserWarning, match="not 4-D"):
        got = metalcore.scaled_dot_product_attention(q[0], k[0], v[0])
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q[0], k[0], v[0]))


def test_transposed_views_as_transformers_passes_them():
    # [B, L, H, D] projections viewed as [B, H, L, D]: no copy is needed (unit last stride).
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 11, 4, 16, generator=g).transpose(1, 2)
    k = torch.randn(2, 13, 2, 16, generator=g).transpose(1, 2)
    v = torch.randn(2, 13, 2, 16, generator=g).transpose(1, 2)
    got = metalcore.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(got, want)


def test_compiled_without_graph_breaks_or_recompiles_across_lengths():
    def f(q, k, v):
        return metalcore.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for i, (lq, lk) in enumerate([(5, 9), (17, 17), (33, 40)]):
        q, k, v = _qkv(1, 4, 2, lq, lk, 8, dtype=torch.float32, seed=i)
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            got = compiled(q, k, v)
        torch.testing.assert_close(got, f(q, k, v))


def test_no_sequence_squared_buffer_at_8192():
    """Forward and backward at S = 8192 (an fp32 score matrix would be 256 MiB) raise the
    process's peak memory by far less than one such matrix."""
    script = textwrap.dedent(
        """
        import resource, torch, metalcore
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 1, 8192, 16, requires_grad=True) for _ in range(3))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out, lse = metalcore.attention(q, k, v, is_causal=True)
        out.sum().backward()
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(grew)  # KiB
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    grew_mib = int(res.stdout.split()[-1]) / 1024
    assert grew_mib < 64, f"peak memory grew {grew_mib:.0f} MiB"
