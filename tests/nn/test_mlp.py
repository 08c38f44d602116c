"""metalcore.nn.SwiGLUMLP: LlamaMLP-compatible parameters and numerics."""

import pytest
import torch
import torch.nn.functional as F

from metalcore.nn import SwiGLUMLP
from metalcore.testing import reference as ref
from tests.users_support import OpCounter, needs_transformers


def _reference(m, x):
    return ref.hf_llama_mlp(x, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)


def test_forward_backward_match_eager_math():
    torch.manual_seed(0)
    m = SwiGLUMLP(32, 80)
    x = torch.randn(2, 5, 32, requires_grad=True)
    with OpCounter() as counter:
        y = m(x)
    assert counter.counts["swiglu"] == 1
    x2 = x.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    wg, wu, wd = params
    y2 = F.linear(F.silu(F.linear(x2, wg)) * F.linear(x2, wu), wd)
    torch.testing.assert_close(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    for p, q in zip(m.parameters(), params):
        torch.testing.assert_close(p.grad, q.grad)
    torch.testing.assert_close(y, _reference(m, x))


@needs_transformers
@pytest.mark.parametrize("bias", [False, True])
def test_state_dict_interchanges_with_llama_mlp(bias):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = LlamaConfig(hidden_size=32, intermediate_size=80, mlp_bias=bias, hidden_act="silu")
    hf = LlamaMLP(cfg)
    ours = SwiGLUMLP(32, 80, bias=bias)
    assert list(ours.state_dict()) == list(hf.state_dict())
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(3, 32)
    torch.testing.assert_close(ours(x), hf(x))
    with torch.no_grad():
        ours.up_proj.weight.mul_(2)
    hf.load_state_dict(ours.state_dict())
    torch.testing.assert_close(hf(x), ours(x))
