"""rope beyond the op contract (tests/ops/test_contract.py runs numerics, gradients, gradcheck,
opcheck, compile, export and bad inputs for every op from its spec): Hugging Face's and GPT-J's
formulations with their own cos/sin tables, q in HF's projection layout with GQA and partial
rotary, the transposed map as the rotation by -theta, double backward, cos/sin that require
grad, and a training step through projections."""

import pytest
import torch

import metalcore
from metalcore.testing import backends as bk
from metalcore.testing import reference as ref
from metalcore.testing.op_specs import SPECS, Sample, TensorArg, tolerance
from tests.support import seeded

ops = torch.ops.metalcore
ROPE_C = 2  # the rope spec's opmath units (metalcore/testing/op_specs.py)


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


def _tol(op, q, k, cos, sin, interleaved, dtype, index):
    args = [TensorArg(t.contiguous()) for t in (q, k, cos, sin)] + [interleaved]
    return SPECS[op].tolerances(Sample(args, dtype=dtype), index)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rot", [128, 64])
def test_matches_hf_formulation_with_hf_tables(interleaved, dtype, rot):
    b, hq, hk, s, d = 2, 8, 2, 33, 128
    # q and k as HF's projections give them: [B, S, H, D].transpose(1, 2); GQA; partial rotary.
    q = seeded(b, s, hq, d, dtype=dtype, seed=1).transpose(1, 2)
    k = seeded(b, s, hk, d, dtype=dtype, seed=2).transpose(1, 2)
    cos, sin = hf_tables(b, s, rot, dtype, interleaved)
    hf = ref.gptj_apply_rotary_pos_emb if interleaved else ref.hf_apply_rotary_pos_emb
    outs = metalcore.rope(q, k, cos, sin, interleaved)
    # HF's formula in float64 on the same (rounded) inputs is the independent reference.
    expected = hf(q.double(), k.double(), cos.double(), sin.double())
    for i, (got, want) in enumerate(zip(outs, expected)):
        tol = _tol("rope", q, k, cos, sin, interleaved, dtype, i)
        bk.compare(got, want, tol, f"rope vs HF ({dtype}, rot {rot}) output {i}")

    # The transposed map of a rotation is the rotation by -theta: rope_backward with HF tables
    # is HF's formula with -sin (in float64).
    g_q, g_k = seeded(*q.shape, dtype=dtype, seed=3), seeded(*k.shape, dtype=dtype, seed=4)
    grads = ops.rope_backward(g_q, g_k, cos, sin, interleaved)
    expected = hf(g_q.double(), g_k.double(), cos.double(), -sin.double())
    for i, (got, want) in enumerate(zip(grads, expected)):
        tol = _tol("rope_backward", g_q, g_k, cos, sin, interleaved, dtype, i)
        bk.compare(got, want, tol, f"rope_backward vs HF with -sin ({dtype}) output {i}")


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotations_preserve_the_norm_of_every_pair(interleaved, dtype):
    # With exact (float32) rotation tables the rotated features keep their norm, up to the
    # one rounding of each output element.
    q = seeded(2, 4, 17, 64, dtype=dtype, seed=5)
    cos, sin = hf_tables(2, 17, 64, torch.float32, interleaved)
    q_out, _ = metalcore.rope(q, q[:, :1], cos, sin, interleaved)
    norms = q_out.double().norm(dim=-1, keepdim=True)
    bk.compare(norms, q.double().norm(dim=-1, keepdim=True), tolerance(dtype, ROPE_C), "norms")


@pytest.mark.parametrize("rot", [0, 4])
def test_features_beyond_rot_pass_through_exactly(device, rot):
    # rot = 0 (pure pass-through) and partial rotary: the features past rot are copied, bit for
    # bit, on every device (bfloat16, where any rounding through another dtype would show).
    q = seeded(1, 2, 3, 8, dtype=torch.bfloat16, seed=11, scale=3)
    cos, sin = seeded(3, rot, dtype=torch.bfloat16, seed=12), seeded(3, rot, seed=13).bfloat16()
    on = device.device
    outs = device.ops.rope(q.to(on), q.to(on), cos.to(on), sin.to(on), False)
    for out in outs:
        assert torch.equal(out.cpu()[..., rot:], q[..., rot:])


@pytest.mark.parametrize("interleaved", [False, True])
def test_double_backward_is_exact(interleaved):
    # rope is linear in (q, k) and its backward is rope_backward, whose backward is rope: second
    # derivatives through autograd are exact.
    q = seeded(2, 2, 5, 8, dtype=torch.float64, seed=6).requires_grad_()
    k = seeded(2, 5, 2, 8, dtype=torch.float64, seed=7).transpose(1, 2).requires_grad_()
    cos, sin = seeded(5, 4, dtype=torch.float64, seed=8), seeded(5, 4, dtype=torch.float64, seed=9)
    assert torch.autograd.gradgradcheck(lambda a, b: ops.rope(a, b, cos, sin, interleaved), (q, k))


def test_cos_sin_requiring_grad_is_an_error():
    q, k = seeded(1, 2, 3, 8, seed=1).requires_grad_(), seeded(1, 1, 3, 8, seed=2)
    cos, sin = seeded(3, 8, seed=3), seeded(3, 8, seed=4)
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


def test_training_step_reaches_every_leaf():
    torch.manual_seed(0)
    m = _Rotary(32)
    x = seeded(2, 6, 32, seed=10).requires_grad_()
    q_out, k_out = m(x, *hf_tables(2, 6, 16, torch.float32))
    (q_out.square().sum() + k_out.sum()).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (x, *m.parameters()))
