"""metalcore.patch on tiny random Hugging Face models (no downloads)."""

import functools
import sys

import pytest
import torch

import metalcore
from metalcore.integrations.hf import patch_classes
from tests.support import export_roundtrip
from tests.users_support import HAS_TRANSFORMERS, OpCounter, has_cpu_kernel

pytestmark = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def tiny_model(family, dtype=torch.float32, seed=0, **overrides):
    import transformers as tf

    cfg_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
    }[family]
    kw = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).to(dtype)
    with torch.no_grad():  # non-trivial norm weights, so a dropped weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return model


def ids(batch=2, seq=12):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(1))


def logits_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=inputs, use_cache=False).logits
    (out.float().pow(2).mean()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


EXPECTED_COUNTS = {"rmsnorm": 5, "rope": 2, "mlp": 2}  # 2 layers x 2 norms + final; 2 attn; 2 mlp


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_logits_and_gradients_match(family):
    model = tiny_model(family)
    x = ids()
    ref_out, ref_grads = logits_and_grads(model, x)
    handle = metalcore.patch(model)
    expected = dict(EXPECTED_COUNTS)
    if family == "qwen3":
        expected["rmsnorm"] += 4  # q_norm and k_norm per layer
    assert {k: len(v) for k, v in handle.patched.items()} == expected
    assert handle.skipped == {}
    with OpCounter() as counter:
        out, grads = logits_and_grads(model, x)
    assert counter.counts["rmsnorm"] == expected["rmsnorm"]
    assert counter.counts["rmsnorm_backward"] == expected["rmsnorm"]
    assert counter.counts["swiglu"] == 2 and counter.counts["swiglu_backward"] == 2
    if has_cpu_kernel("rope"):
        assert counter.counts["rope"] == 2 and counter.counts["rope_backward"] == 2
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    handle.undo()


def test_bf16_model_matches_within_bf16_tolerance():
    model = tiny_model("llama", torch.bfloat16)
    x = ids()
    ref_out, ref_grads = logits_and_grads(model, x)
    with metalcore.patch(model):
        out, grads = logits_and_grads(model, x)
    # HF's norm rounds twice in bf16, the op once: differences of a few bf16 ulps propagate.
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=5e-2, atol=5e-2)
    for name in grads:
        rel = (grads[name].float() - ref_grads[name].float()).norm() / ref_grads[
            name
        ].float().norm()
        assert rel < 5e-2, name


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_undo_restores_exactly(family):
    model = tiny_model(family)
    x = ids()
    modules_before = dict(model.named_modules())
    params_before = {n: p for n, p in model.named_parameters()}
    dicts_before = {n: set(m.__dict__) for n, m in model.named_modules()}
    with torch.no_grad():
        before = model(input_ids=x, use_cache=False).logits
    handle = metalcore.patch(model)
    assert "forward" in model.model.norm.__dict__
    assert {n: p for n, p in model.named_parameters()} == params_before  # same objects
    handle.undo()
    handle.undo()  # idempotent
    assert dict(model.named_modules()) == modules_before
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == dicts_before
    for m in model.modules():
        assert "forward" not in m.__dict__
        assert m.forward.__func__ is type(m).forward
    with OpCounter() as counter, torch.no_grad():
        after = model(input_ids=x, use_cache=False).logits
    assert not counter.counts
    assert torch.equal(after, before)


def test_patch_is_scoped_to_the_model():
    import transformers.models.llama.modeling_llama as ml

    rotary_before = ml.apply_rotary_pos_emb
    forwards_before = {c: c.forward for c in (ml.LlamaRMSNorm, ml.LlamaMLP, ml.LlamaAttention)}
    patched, other = tiny_model("llama"), tiny_model("llama")
    handle = metalcore.patch(patched)
    assert ml.apply_rotary_pos_emb is rotary_before
    assert {c: c.forward for c in forwards_before} == forwards_before
    with OpCounter() as counter, torch.no_grad():
        other(input_ids=ids(), use_cache=False)
    assert not counter.counts
    # A second patch of the same model is refused per module, not stacked.
    again = metalcore.patch(patched)
    assert sum(map(len, again.patched.values())) == 0
    assert all("already patched" in r for r in again.skipped.values())
    handle.undo()


def test_state_dict_unchanged_and_loads_into_unpatched_model():
    model = tiny_model("mistral")
    keys = list(model.state_dict())
    with metalcore.patch(model):
        sd = model.state_dict()
        assert list(sd) == keys
        fresh = tiny_model("mistral", seed=1)
        fresh.load_state_dict(sd)
        with torch.no_grad():
            torch.testing.assert_close(
                fresh(input_ids=ids(), use_cache=False).logits,
                model(input_ids=ids(), use_cache=False).logits,
                rtol=1e-5,
                atol=1e-5,
            )


def test_accelerate_style_hooks_survive():
    model = tiny_model("llama")
    norm = model.model.norm
    calls = []

    def new_forward(module, *args, **kwargs):  # what accelerate's add_hook_to_module installs
        calls.append(1)
        return module._old_forward(*args, **kwargs)

    norm._hf_hook = object()
    norm._old_forward = norm.forward
    hooked = functools.update_wrapper(functools.partial(new_forward, norm), norm._old_forward)
    norm.forward = hooked
    old_forward = norm._old_forward
    handle = metalcore.patch(model)
    assert norm.forward is hooked and norm._old_forward is not old_forward
    with OpCounter() as counter, torch.no_grad():
        model(input_ids=ids(), use_cache=False)
    assert calls and counter.counts["rmsnorm"] == 5
    handle.undo()
    assert norm.forward is hooked and norm._old_forward is old_forward


def test_unknown_norms_are_left_untouched_and_reported():
    # Gemma's RMSNorm scales by (1 + weight): not the Llama formula, so it must not be swapped.
    model = tiny_model("gemma", hidden_act="gelu_pytorch_tanh")
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x, use_cache=False).logits
    handle = metalcore.patch(model)
    assert handle.patched["rmsnorm"] == []
    assert any("GemmaRMSNorm" in r for r in handle.skipped.values())
    with OpCounter() as counter, torch.no_grad():
        after = model(input_ids=x, use_cache=False).logits
    assert "rmsnorm" not in counter.counts and torch.equal(after, before)
    handle.undo()


def test_plain_torch_model_rmsnorms_are_patched_and_metalcore_ones_left_alone():
    model = torch.nn.Sequential(torch.nn.RMSNorm(16, eps=1e-6), metalcore.nn.RMSNorm(16))
    x = torch.randn(3, 16)
    before = model(x)
    with metalcore.patch(model) as handle:
        assert handle.patched["rmsnorm"] == ["0"] and handle.skipped == {}
        with OpCounter() as counter:
            after = model(x)
        assert counter.counts["rmsnorm"] == 2
        torch.testing.assert_close(after, before)
    assert "forward" not in model[0].__dict__


def test_non_silu_mlp_is_left_untouched():
    model = tiny_model("llama", hidden_act="gelu")
    handle = metalcore.patch(model)
    assert handle.patched["mlp"] == [] and any("not SiLU" in r for r in handle.skipped.values())
    handle.undo()


def test_patch_classes_is_global_opt_in_and_reversible():
    import transformers.models.qwen2.modeling_qwen2 as mq

    before = {c: c.__dict__["forward"] for c in (mq.Qwen2RMSNorm, mq.Qwen2MLP, mq.Qwen2Attention)}
    handle = patch_classes(["qwen2"])
    try:
        assert len(handle.patched["rmsnorm"]) == 1 and len(handle.patched["rope"]) == 1
        model = tiny_model("qwen2")  # created after patching: patched too
        with OpCounter() as counter, torch.no_grad():
            model(input_ids=ids(), use_cache=False)
        assert counter.counts["rmsnorm"] == 5 and counter.counts["swiglu"] == 2
    finally:
        handle.undo()
    assert {c: c.__dict__["forward"] for c in before} == before
    with pytest.raises(ValueError, match="unknown family"):
        patch_classes(["gpt2"])


def _recording_backend(graphs):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record)


def test_compile_fullgraph_of_patched_model():
    model = tiny_model("llama")
    x = ids()
    ref_out, ref_grads = logits_and_grads(model, x)
    handle = metalcore.patch(model)
    graphs = []
    compiled = torch.compile(model, fullgraph=True, backend=_recording_backend(graphs))
    compiled.zero_grad(set_to_none=True)
    out = compiled(input_ids=x, use_cache=False).logits
    out.float().pow(2).mean().backward()
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    for op in ["rmsnorm", "swiglu", "rmsnorm_backward", "swiglu_backward"] + (
        ["rope", "rope_backward"] if has_cpu_kernel("rope") else []
    ):
        assert f"metalcore.{op}.default" in targets, op
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-5)
    handle.undo()


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def test_export_roundtrip_of_patched_model_in_fresh_process(tmp_path):
    model = tiny_model("qwen3").eval()
    handle = metalcore.patch(model)
    seq = torch.export.Dim("seq", min=2, max=64)
    expect = ["metalcore.rmsnorm.default", "metalcore.swiglu.default"]
    if has_cpu_kernel("rope"):
        expect.append("metalcore.rope.default")
    with torch.no_grad():
        export_roundtrip(
            _Logits(model), (ids(2, 10),), ({1: seq},), (ids(2, 23),), tmp_path, expect
        )
    handle.undo()
    assert "transformers" in sys.modules
