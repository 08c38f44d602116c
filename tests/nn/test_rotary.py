"""metalcore.nn.RotaryEmbedding: Hugging Face cos/sin tables and rope application."""

import pytest
import torch

from metalcore.nn import RotaryEmbedding, apply_rotary, apply_rotary_torch
from tests.users_support import OpCounter, needs_kernel, needs_transformers

SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
]


@needs_transformers
@pytest.mark.parametrize("scaling", SCALINGS, ids=["default", "linear", "llama3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cos_sin_identical_to_hf(scaling, dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {"rope_type": "default", "rope_theta": 50000.0}
    params.update(scaling or {})
    cfg = LlamaConfig(
        hidden_size=128,
        num_attention_heads=4,
        max_position_embeddings=256,
        rope_parameters=params,
    )
    hf = LlamaRotaryEmbedding(cfg)
    ours = RotaryEmbedding.from_config(cfg)
    assert ours.dim == 32 and ours.rope_type == params["rope_type"]
    assert torch.equal(ours.inv_freq, hf.inv_freq)
    x = torch.randn(2, 3, 128, dtype=dtype)
    pos = torch.stack([torch.arange(0, 200, 2), torch.arange(300, 400)])
    for a, b in zip(ours(x, pos), hf(x, pos)):
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a, b)
    assert list(ours.state_dict()) == list(hf.state_dict()) == []


def test_llama3_scaling_bands():
    # Short wavelengths untouched, long ones divided by factor, the band between blended.
    base = RotaryEmbedding(64, base=500000.0).inv_freq
    scaled = RotaryEmbedding(64, base=500000.0, rope_scaling=SCALINGS[2]).inv_freq
    wavelen = 2 * torch.pi / base
    short, long = wavelen < 64 / 4.0, wavelen > 64 / 1.0
    assert short.any() and long.any() and (~short & ~long).any()
    torch.testing.assert_close(scaled[short], base[short], rtol=0, atol=0)
    torch.testing.assert_close(scaled[long], base[long] / 8.0)
    mid = ~short & ~long
    assert ((scaled[mid] < base[mid]) & (scaled[mid] > base[mid] / 8.0)).all()


def test_unsupported_rope_type_is_a_clear_error():
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        RotaryEmbedding(64, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(63)


@needs_transformers
def test_torch_math_matches_hf_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = torch.randn(2, 4, 9, 32), torch.randn(2, 2, 9, 32)
    rot = RotaryEmbedding(32)
    cos, sin = rot(q, torch.arange(9).expand(2, 9))
    for a, b in zip(apply_rotary_torch(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_kernel("rope")
@pytest.mark.parametrize("partial", [False, True])
def test_apply_uses_the_op_and_matches_torch_math(partial):
    d = 32
    rot = RotaryEmbedding(16 if partial else d)
    q = torch.randn(2, 4, 9, d, requires_grad=True)
    k = torch.randn(2, 2, 9, d, requires_grad=True)
    cos, sin = rot(q, torch.arange(9).unsqueeze(0))
    with OpCounter() as counter:
        qo, ko = rot.apply(q, k, cos, sin)
    assert counter.counts["rope"] == 1
    q2, k2 = (t.detach().clone().requires_grad_() for t in (q, k))
    qe, ke = apply_rotary_torch(q2, k2, cos, sin)
    torch.testing.assert_close(qo, qe)
    torch.testing.assert_close(ko, ke)
    (qo.sum() + 2 * ko.sum()).backward()
    (qe.sum() + 2 * ke.sum()).backward()
    torch.testing.assert_close(q.grad, q2.grad)
    torch.testing.assert_close(k.grad, k2.grad)


def test_apply_falls_back_when_tables_require_grad():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    ang = torch.randn(4, 8, requires_grad=True)
    cos, sin = ang.cos(), ang.sin()
    with OpCounter() as counter:
        qo, _ = apply_rotary(q, k, cos, sin)
    assert not counter.counts
    qo.sum().backward()
    assert ang.grad is not None  # the gradient to the tables is kept, not dropped
