"""rope: numerics vs the HF/GPT-J references, gradients, opcheck, compile, export, bad input."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import metalcore
from metalcore.testing import reference as ref
from tests.support import (
    FLOAT_DTYPES,
    LAYOUTS,
    REPO,
    assert_close,
    check_compile_no_recompile,
    export_roundtrip,
    make_layout,
)

ops = torch.ops.metalcore

# Head dims around the vector widths (8/16 lanes per half) with odd half sizes; rot is either
# the full head dim or any even partial width (0 = pure pass-through is tested separately).
HEAD_DIMS = [2, 6, 8, 18, 32, 34, 64, 80, 128]
QK_LAYOUTS = [*LAYOUTS, "heads_transposed"]
TABLE_FORMS = ["2d", "3d", "batch1"]


@st.composite
def rope_cases(draw, dtypes=FLOAT_DTYPES):
    d = draw(st.sampled_from(HEAD_DIMS))
    return dict(
        b=draw(st.integers(1, 3)),
        hq=draw(st.integers(1, 5)),
        hk=draw(st.integers(1, 3)),
        s=draw(st.integers(1, 40)),
        d=d,
        rot=draw(st.one_of(st.just(d), st.integers(1, d // 2).map(lambda i: 2 * i))),
        dtype=draw(st.sampled_from(dtypes)),
        table=draw(st.sampled_from(TABLE_FORMS)),
        fp32_table=draw(st.booleans()),
        layout=draw(st.sampled_from(QK_LAYOUTS)),
        interleaved=draw(st.booleans()),
    )


def qk_layout(t, layout):
    """make_layout plus the layout HF's projections give: [B, S, H, D].transpose(1, 2)."""
    if layout == "heads_transposed":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return make_layout(t, layout)


def make_tables(c, dtype=None):
    """Random (not rotation-shaped) cos/sin, so every coefficient position is exercised."""
    if dtype is None:
        reduced = c["dtype"] in (torch.float16, torch.bfloat16)
        dtype = torch.float32 if c["fp32_table"] and reduced else c["dtype"]
    shape = {
        "2d": (c["s"], c["rot"]),
        "3d": (c["b"], c["s"], c["rot"]),
        "batch1": (1, c["s"], c["rot"]),
    }[c["table"]]
    return torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)


def make_qk(c, dtype=None, layout=None):
    dtype = dtype or c["dtype"]
    layout = layout or c["layout"]
    q = torch.randn(c["b"], c["hq"], c["s"], c["d"], dtype=dtype)
    k = torch.randn(c["b"], c["hk"], c["s"], c["d"], dtype=dtype)
    return qk_layout(q, layout), qk_layout(k, layout)


def hf_tables(b, s, rot, dtype, interleaved=False, base=10000.0):
    """cos/sin as HF's rotary embedding builds them ([B, S, rot], float32 math, then cast)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    pos = torch.arange(s, dtype=torch.float32)[None, :].expand(b, s) + torch.arange(b)[:, None]
    freqs = pos[..., None] * inv_freq  # [B, S, rot/2]
    if interleaved:
        emb = torch.repeat_interleave(freqs, 2, dim=-1)  # GPT-J: one angle per pair (2i, 2i+1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@given(c=rope_cases(dtypes=[*FLOAT_DTYPES, torch.float64]))
def test_forward_matches_float64_reference(c):
    q, k = make_qk(c)
    cos, sin = make_tables(c)
    q_out, k_out = metalcore.rope(q, k, cos, sin, c["interleaved"])
    for out, x in ((q_out, q), (k_out, k)):
        assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    q_ref, k_ref = ref.rope(q, k, cos, sin, c["interleaved"])
    assert_close(q_out, q_ref)
    assert_close(k_out, k_ref)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rot", [128, 64])
def test_matches_hf_formulation_with_hf_tables(interleaved, dtype, rot):
    b, hq, hk, s, d = 2, 8, 2, 33, 128
    q = torch.randn(b, s, hq, d, dtype=dtype).transpose(
        1, 2
    )  # as HF's q_proj(...).view().transpose
    k = torch.randn(b, s, hk, d, dtype=dtype).transpose(1, 2)
    cos, sin = hf_tables(b, s, rot, dtype, interleaved)
    q_out, k_out = metalcore.rope(q, k, cos, sin, interleaved)
    hf = ref.gptj_apply_rotary_pos_emb if interleaved else ref.hf_apply_rotary_pos_emb
    q_hf, k_hf = hf(q, k, cos, sin)  # in `dtype`: rounds after each op, metalcore only once
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3.2e-2}[dtype]
    torch.testing.assert_close(q_out, q_hf, rtol=tol, atol=tol)
    torch.testing.assert_close(k_out, k_hf, rtol=tol, atol=tol)
    # Rotations preserve the norm of every rotated pair.
    torch.testing.assert_close(
        q_out[..., :rot].double().norm(dim=-1),
        q[..., :rot].double().norm(dim=-1),
        rtol=tol,
        atol=tol,
    )
    # For HF tables the transposed map is the rotation by -theta.
    g_q, g_k = torch.randn_like(q_out), torch.randn_like(k_out)
    dq, dk = ops.rope_backward(g_q, g_k, cos, sin, interleaved)
    dq_ref, dk_ref = ops.rope(g_q, g_k, cos, -sin, interleaved)
    torch.testing.assert_close(dq, dq_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dk, dk_ref, rtol=tol, atol=tol)


@given(c=rope_cases())
def test_backward_matches_float64_autograd(c):
    g_q, g_k = make_qk(c)  # gradients in the drawn layout
    cos, sin = make_tables(c)
    dq, dk = ops.rope_backward(g_q, g_k, cos, sin, c["interleaved"])
    assert dq.is_contiguous() and dk.is_contiguous() and dq.dtype == c["dtype"]
    q64 = torch.randn(g_q.shape, dtype=torch.float64, requires_grad=True)
    k64 = torch.randn(g_k.shape, dtype=torch.float64, requires_grad=True)
    fn = ref.gptj_apply_rotary_pos_emb if c["interleaved"] else ref.hf_apply_rotary_pos_emb
    outs = fn(q64, k64, cos.double(), sin.double())
    torch.autograd.backward(outs, (g_q.double(), g_k.double()))
    assert_close(dq, q64.grad, c["dtype"])
    assert_close(dk, k64.grad, c["dtype"])


@given(c=rope_cases(dtypes=[torch.float32, torch.bfloat16]))
def test_autograd_through_op_matches_reference(c):
    q, k = make_qk(c)
    cos, sin = make_tables(c)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_out, k_out = metalcore.rope(q, k, cos, sin, c["interleaved"])
    g_q, g_k = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward((q_out, k_out), (g_q, g_k))
    dq, dk = ops.rope_backward(g_q, g_k, cos, sin, c["interleaved"])
    torch.testing.assert_close(q.grad, dq, rtol=0, atol=0)
    torch.testing.assert_close(k.grad, dk, rtol=0, atol=0)


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_float64(interleaved):
    f64 = dict(dtype=torch.float64)
    for hq, hk, d, rot, table in [(3, 1, 10, 10, (2,)), (4, 2, 12, 6, (1,)), (2, 2, 8, 4, ())]:
        q = torch.randn(2, hq, 5, d, **f64, requires_grad=True)
        k = torch.randn(2, 5, hk, d, **f64).transpose(1, 2).requires_grad_()
        cos = torch.randn(*table, 5, rot, **f64)  # random, not rotation-shaped
        sin = torch.randn(*table, 5, rot, **f64)

        def fn(a, b, cos=cos, sin=sin):
            return ops.rope(a, b, cos, sin, interleaved)

        assert torch.autograd.gradcheck(fn, (q, k))
        if table == ():
            # The backward of rope_backward is rope: double backward is exact too.
            assert torch.autograd.gradgradcheck(fn, (q, k))
        # One output unused: the other still gets its gradient.
        assert torch.autograd.gradcheck(lambda a, b, fn=fn: fn(a, b)[1], (q, k))


@given(c=rope_cases(), rg=st.booleans())
def test_opcheck(c, rg):
    q, k = make_qk(c)
    cos, sin = make_tables(c)
    args = (q.detach().requires_grad_(rg), k.detach().requires_grad_(rg), cos, sin)
    torch.library.opcheck(ops.rope.default, (*args, c["interleaved"]))
    torch.library.opcheck(ops.rope_backward.default, (*args, c["interleaved"]))


def test_cos_sin_requiring_grad_is_an_error():
    q, k = torch.randn(1, 2, 3, 8, requires_grad=True), torch.randn(1, 1, 3, 8)
    cos, sin = torch.randn(3, 8), torch.randn(3, 8)
    msg = r"metalcore\.rope: gradients with respect to 'cos'/'sin' are not supported"
    for c, s in ((cos.requires_grad_(), sin), (cos.detach(), sin.requires_grad_())):
        with pytest.raises(RuntimeError, match=msg):
            metalcore.rope(q, k, c, s)
        with pytest.raises(RuntimeError, match=msg.replace("rope", "rope_backward")):
            ops.rope_backward(q, k, c, s)
        # Without grad mode nothing is recorded, so nothing can be dropped.
        with torch.no_grad():
            torch.testing.assert_close(
                metalcore.rope(q, k, c, s)[0], ops.rope(q, k, c.detach(), s.detach())[0]
            )
    # Tables that come from a no-grad computation work with q/k that require grad.
    q_out, k_out = metalcore.rope(q, k, cos.detach(), sin.detach())
    assert q_out.requires_grad and k_out.requires_grad  # one output node for both
    # Nothing requires grad: the inference path records nothing.
    q_out, k_out = metalcore.rope(q.detach(), k, cos.detach(), sin.detach())
    assert q_out.grad_fn is None and k_out.grad_fn is None


def test_empty_and_special_values():
    for qs, ks, cs in [
        ((0, 2, 3, 8), (0, 1, 3, 8), (3, 8)),
        ((1, 2, 0, 8), (1, 1, 0, 8), (1, 0, 8)),
        ((1, 0, 3, 8), (1, 0, 3, 8), (3, 4)),
        ((1, 2, 3, 0), (1, 1, 3, 0), (3, 0)),
    ]:
        q, k, cos = torch.randn(qs), torch.randn(ks), torch.randn(cs)
        q_out, k_out = metalcore.rope(q, k, cos, cos)
        assert q_out.shape == q.shape and k_out.shape == k.shape
        dq, dk = ops.rope_backward(q, k, cos, cos)
        assert dq.shape == q.shape and dk.shape == k.shape
    # Only k non-empty, and rot = 0 (everything passes through).
    k = torch.randn(1, 2, 3, 8)
    q0 = torch.randn(1, 0, 3, 8)
    cos, sin = torch.randn(3, 4), torch.randn(3, 4)
    assert_close(metalcore.rope(q0, k, cos, sin)[1], ref.rope(q0, k, cos, sin)[1])
    q_out, _ = metalcore.rope(k, k, torch.randn(3, 0), torch.randn(3, 0))
    torch.testing.assert_close(q_out, k, rtol=0, atol=0)
    # NaN/Inf in q or in the tables propagate exactly as in the reference.
    for interleaved in (False, True):
        q = torch.randn(1, 2, 4, 8)
        q[0, 0, 1, 2] = float("nan")
        q[0, 1, 2, 5] = float("inf")
        cos, sin = torch.randn(4, 8), torch.randn(4, 8)
        cos[3, 0] = float("inf")
        q_out, _ = metalcore.rope(q, q, cos, sin, interleaved)
        q_ref, _ = ref.rope(q, q, cos, sin, interleaved)
        torch.testing.assert_close(q_out, q_ref, equal_nan=True)
        assert torch.isnan(q_out[0, 0, 1]).any() and torch.isfinite(q_out[0, 0, 0]).all()


def test_bad_inputs_name_op_and_argument():
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = torch.randn(5, 8), torch.randn(5, 8)
    cases = [
        ((q[0], k, cos, sin), ValueError, r"rope: 'q' must be 4-D"),
        ((q, k[0], cos, sin), ValueError, r"rope: 'k' must be 4-D"),
        ((q, torch.randn(3, 2, 5, 8), cos, sin), ValueError, r"rope: 'k' must have the batch"),
        ((q, torch.randn(2, 2, 6, 8), cos, sin), ValueError, r"rope: 'k' must have the batch"),
        ((q, torch.randn(2, 2, 5, 6), cos, sin), ValueError, r"rope: 'k' must have the batch"),
        ((q, k, cos[0], sin[0]), ValueError, r"rope: 'cos' must be 2-D \[seq, rot\] or 3-D"),
        ((q, k, cos, sin[:, :6]), ValueError, r"rope: 'sin' must have the same shape as 'cos'"),
        ((q, k, cos[:4], sin[:4]), ValueError, r"rope: 'cos' must have seq = 5"),
        ((q, k, torch.randn(3, 5, 8), torch.randn(3, 5, 8)), ValueError, r"must have batch 1 or 2"),
        ((q, k, cos[:, :7], sin[:, :7]), ValueError, r"\(rot\) must be even and <= head_dim = 8"),
        ((q, k, torch.randn(5, 10), torch.randn(5, 10)), ValueError, r"\(rot\) must be even"),
        ((q, k.double(), cos, sin), TypeError, r"rope: 'k' must have the same dtype as 'q'"),
        (
            (q, k, cos.double(), sin.double()),
            TypeError,
            r"rope: 'cos' must have the same dtype as 'q' \(Float\), got Double",
        ),
        (
            (q.half(), k.half(), cos.double(), sin.double()),
            TypeError,
            r"\(Half\) or float32, got Double",
        ),
        (
            (q.half(), k.half(), cos, sin.half()),
            TypeError,
            r"rope: 'sin' must have the same dtype as 'cos'",
        ),
        (
            (q.int(), k, cos, sin),
            TypeError,
            r"rope: 'q' must be float16, bfloat16, float32 or float64",
        ),
        ((q, k, cos.int(), sin), TypeError, r"rope: 'cos' must be float16"),
        (
            (q, k, cos, torch.randn(5, 8, device="meta")),
            RuntimeError,
            r"rope: 'sin' must be on the same device as 'q'",
        ),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=r"metalcore\.rope: .*" + msg.removeprefix("rope: ")):
            ops.rope(*args)
    with pytest.raises(
        ValueError, match=r"metalcore\.rope_backward: 'grad_k_out' must have the batch"
    ):
        ops.rope_backward(q, torch.randn(2, 2, 6, 8), cos, sin)
    with pytest.raises(
        TypeError,
        match=r"metalcore\.rope_backward: 'grad_k_out' must have the same dtype as 'grad_q_out'",
    ):
        ops.rope_backward(q, k.double(), cos, sin)


def test_compile_fullgraph_without_recompiles():
    def attn_inputs(q, k, cos, sin):
        q_out, k_out = ops.rope(q, k, cos, sin, False)
        return q_out * 2, k_out + 1

    def make_args(s):
        q = torch.randn(2, s, 4, 16).transpose(1, 2)
        k = torch.randn(2, 2, s, 16)
        cos, sin = hf_tables(2, s, 16, torch.float32)
        return q, k, cos, sin

    check_compile_no_recompile(attn_inputs, make_args, [5, 9, 17, 33])

    # Forward + backward under compile: the backward graph runs metalcore.rope_backward.
    compiled = torch.compile(attn_inputs, fullgraph=True, dynamic=True)
    q, k, cos, sin = make_args(7)
    leaves = [q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()]
    sum(o.sum() for o in compiled(*leaves, cos, sin)).backward()
    leaves2 = [t.detach().clone().requires_grad_() for t in (q, k)]
    sum(o.sum() for o in attn_inputs(*leaves2, cos, sin)).backward()
    for a, b in zip(leaves, leaves2, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


class _Rotary(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj = torch.nn.Linear(d, 4 * 16)
        self.k_proj = torch.nn.Linear(d, 2 * 16)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, 4, 16).transpose(1, 2)
        k = self.k_proj(x).view(b, s, 2, 16).transpose(1, 2)
        return metalcore.rope(q, k, cos, sin)


def test_export_roundtrip_in_fresh_process(tmp_path):
    m = _Rotary(32)
    b, s = torch.export.Dim("b", max=64), torch.export.Dim("s", max=512)
    args = (torch.randn(2, 5, 32), *hf_tables(2, 5, 16, torch.float32))
    other = (torch.randn(3, 11, 32), *hf_tables(3, 11, 16, torch.float32))
    shapes = ({0: b, 1: s}, {0: b, 1: s}, {0: b, 1: s})
    export_roundtrip(m, args, shapes, other, tmp_path, expect_ops=["metalcore.rope.default"])


def test_training_step_reaches_every_leaf():
    m = _Rotary(32)
    x = torch.randn(2, 6, 32, requires_grad=True)
    q_out, k_out = m(x, *hf_tables(2, 6, 16, torch.float32))
    (q_out.square().sum() + k_out.sum()).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (x, *m.parameters()))


def test_portable_kernels_match_reference():
    # The DEFAULT (non-AVX2) build of the kernels, selected as torch selects its own.
    script = textwrap.dedent(
        """
        import torch, metalcore
        from metalcore.testing import reference as ref
        for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for inter in (False, True):
                q = torch.randn(2, 9, 3, 40, dtype=dt).transpose(1, 2)
                k = torch.randn(2, 1, 9, 40, dtype=dt)
                cos, sin = torch.randn(9, 36, dtype=dt), torch.randn(9, 36, dtype=dt)
                outs = metalcore.rope(q, k, cos, sin, inter)
                for a, b in zip(outs, ref.rope(q, k, cos, sin, inter), strict=True):
                    torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1.6e-2)
        """
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
