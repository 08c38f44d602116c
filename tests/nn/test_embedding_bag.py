"""metalcore.nn.EmbeddingBag against torch.nn.EmbeddingBag: the same outputs and weight (and
per_sample_weights) gradients in every mode and input form, state_dict interchange, from_torch
sharing the parameter, and torch's own path for the settings the op does not cover."""

from __future__ import annotations

import pytest
import torch

import metalcore
from metalcore import nn as mnn


def _pair(mode, padding_idx=None, include_last_offset=False, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    ref = torch.nn.EmbeddingBag(
        30,
        7,
        mode=mode,
        padding_idx=padding_idx,
        include_last_offset=include_last_offset,
        dtype=dtype,
        **kw,
    )
    ours = mnn.EmbeddingBag.from_torch(ref)
    twin = torch.nn.EmbeddingBag(
        30, 7, mode=mode, padding_idx=padding_idx, include_last_offset=include_last_offset, **kw
    ).to(dtype)
    twin.load_state_dict(ref.state_dict())
    return ours, twin


def _compare(ours, twin, *args, psw=None, rtol=1e-6, atol=1e-6):
    args_t = list(args)
    if psw is not None:
        p1, p2 = psw.clone().requires_grad_(), psw.clone().requires_grad_()
        y1, y2 = ours(*args_t, per_sample_weights=p1), twin(*args_t, per_sample_weights=p2)
    else:
        y1, y2 = ours(*args_t), twin(*args_t)
    torch.testing.assert_close(y1, y2, rtol=rtol, atol=atol)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(ours.weight.grad, twin.weight.grad, rtol=rtol, atol=atol)
    if psw is not None:
        torch.testing.assert_close(p1.grad, p2.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_matches_torch(mode, index_dtype):
    idx = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], dtype=index_dtype)
    off = torch.tensor([0, 2, 2, 7], dtype=index_dtype)  # an empty bag
    ours, twin = _pair(mode, padding_idx=5)
    _compare(ours, twin, idx, off)
    ours, twin = _pair(mode)
    _compare(ours, twin, idx[:8].view(2, 4))  # 2-D: one bag per row


def test_per_sample_weights_and_last_offset():
    idx = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    ours, twin = _pair("sum", include_last_offset=True)
    psw = torch.randn(7)
    _compare(ours, twin, idx, torch.tensor([0, 3, 7]), psw=psw)


def test_bfloat16_weights():
    idx = torch.randint(0, 30, (40,))
    ours, twin = _pair("mean", dtype=torch.bfloat16)
    _compare(ours, twin, idx, torch.arange(0, 40, 8), rtol=2e-2, atol=2e-2)


def test_is_a_torch_module_with_its_state_dict():
    ours, twin = _pair("sum")
    assert isinstance(ours, torch.nn.EmbeddingBag)
    assert ours.state_dict().keys() == twin.state_dict().keys()
    fresh = mnn.EmbeddingBag(30, 7, mode="sum")
    fresh.load_state_dict(twin.state_dict())
    assert torch.equal(fresh.weight, twin.weight)


def test_from_torch_shares_the_parameter():
    ref = torch.nn.EmbeddingBag(10, 4, mode="sum")
    ours = mnn.EmbeddingBag.from_torch(ref)
    assert ours.weight is ref.weight
    opt = torch.optim.SGD(ref.parameters(), lr=1.0)
    ours(torch.tensor([[1, 2]])).sum().backward()
    before = ref.weight.detach().clone()
    opt.step()
    assert not torch.equal(ref.weight, before)


def test_runs_the_op(monkeypatch):
    calls = []
    real = metalcore.functional.embedding_bag
    monkeypatch.setattr(
        metalcore.functional, "embedding_bag", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    ours, _ = _pair("mean")
    ours(torch.tensor([[1, 2, 3]]))
    assert calls


@pytest.mark.parametrize("kw", [{"max_norm": 1.0}, {"scale_grad_by_freq": True}, {"sparse": True}])
def test_uncovered_settings_run_torch(kw, monkeypatch):
    monkeypatch.setattr(
        metalcore.functional,
        "embedding_bag",
        lambda *a, **k: pytest.fail("the op ran for a setting it does not cover"),
    )
    mode = "sum"
    ours, twin = _pair(mode, **kw)
    idx = torch.tensor([[1, 2, 2], [4, 5, 6]])
    torch.testing.assert_close(ours(idx), twin(idx))
    assert torch.equal(ours.weight, twin.weight)  # max_norm renormalised both in place


def test_compiles_fullgraph():
    ours, twin = _pair("sum")
    idx = torch.randint(0, 30, (4, 5))
    compiled = torch.compile(ours, fullgraph=True)
    torch.testing.assert_close(compiled(idx), twin(idx))
