"""metalcore.patch on tiny random Hugging Face models (no downloads)."""

import copy
import functools
import inspect
import io
import pickle
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


# 2 layers x 2 norms + final; 2 attn; 2 mlp; the ForCausalLM head + loss
EXPECTED_COUNTS = {"rmsnorm": 5, "rope": 2, "mlp": 2, "lm_loss": 1}


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


def _copy_by(how, model):
    if how == "deepcopy":
        return copy.deepcopy(model)
    if how == "pickle":
        return pickle.loads(pickle.dumps(model))
    buf = io.BytesIO()
    torch.save(model, buf)  # the whole module, not a state_dict
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_of_a_patched_model_compute_with_their_own_weights(how):
    model = tiny_model("llama")
    x = ids()
    handle = metalcore.patch(model)
    signature = inspect.signature(model.model.norm.forward)
    clone = _copy_by(how, model)
    with torch.no_grad():  # the copy's own weights: every norm doubled
        for name, p in clone.named_parameters():
            if "norm" in name:
                p.mul_(2)
    reference = tiny_model("llama")  # unpatched, with the copy's weights
    reference.load_state_dict(clone.state_dict())
    with torch.no_grad():
        expected = reference(input_ids=x, use_cache=False).logits
        with OpCounter() as counter:
            got = clone(input_ids=x, use_cache=False).logits
    # The copy is patched (metalcore path) and uses its own weights.
    assert counter.counts["rmsnorm"] == 5 and counter.counts["swiglu"] == 2
    if has_cpu_kernel("rope"):
        assert counter.counts["rope"] == 2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert inspect.signature(clone.model.norm.forward) == signature
    # Fallback path: bfloat16 norm weights under float32 activations run transformers' own
    # forward, which must be the copy's, not the original module's.
    for m in (clone, reference):
        for name, mod in m.named_modules():
            if name.endswith("norm"):
                mod.to(torch.bfloat16)
    with torch.no_grad():
        expected = reference(input_ids=x, use_cache=False).logits
        with OpCounter() as counter:
            got = clone(input_ids=x, use_cache=False).logits
    assert "rmsnorm" not in counter.counts
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The original is untouched by the copy, and undo() restores it alone.
    with torch.no_grad():
        before = model(input_ids=x, use_cache=False).logits
    handle.undo()
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x, use_cache=False).logits, before)
        assert torch.equal(clone(input_ids=x, use_cache=False).logits, got)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_of_patched_torch_rmsnorm_and_hooked_modules(how):
    model = torch.nn.Sequential(torch.nn.RMSNorm(16, eps=1e-6), torch.nn.RMSNorm(16))
    calls = []
    hooked = model[1]
    hooked._hf_hook = True
    hooked._old_forward = hooked.forward
    hooked.forward = functools.partial(_count_and_forward, calls, hooked)
    handle = metalcore.patch(model)
    assert handle.patched["rmsnorm"] == ["0", "1"]
    clone = _copy_by(how, model)
    with torch.no_grad():
        for i, m in enumerate(clone):
            m.weight.copy_(torch.linspace(0.5, 2.0, 16) * (i + 1))
    reference = torch.nn.Sequential(torch.nn.RMSNorm(16, eps=1e-6), torch.nn.RMSNorm(16))
    reference.load_state_dict(clone.state_dict())
    x = torch.randn(3, 16)
    with OpCounter() as counter:
        torch.testing.assert_close(clone(x), reference(x))
    clone_calls = clone[1].forward.args[0]  # the copy's hook holds a copy of the list
    assert counter.counts["rmsnorm"] == 2 and len(clone_calls) == 1 and not calls
    clone.to(torch.bfloat16)  # weights in another dtype: torch's forward, with the copy's weights
    reference.to(torch.bfloat16)
    with OpCounter() as counter:
        torch.testing.assert_close(clone(x), reference(x))
    assert not counter.counts
    handle.undo()
    assert "forward" not in model[0].__dict__ and "_old_forward" in model[1].__dict__
    assert model[1]._old_forward.__func__ is torch.nn.RMSNorm.forward


def _count_and_forward(calls, module, *args, **kwargs):  # a picklable accelerate-style hook
    calls.append(1)
    return module._old_forward(*args, **kwargs)


def test_patch_of_something_else_than_a_module_is_a_clear_error():
    with pytest.raises(TypeError, match=r"metalcore.patch: 'model' must be a torch.nn.Module"):
        metalcore.patch(None)
    with pytest.raises(TypeError, match="got dict"):
        metalcore.patch({"model": tiny_model("llama")})


# --- LayerNorm models (GPT-2, BERT) ---------------------------------------------------------


def lm_loss_and_grads(model, inputs, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=inputs, labels=labels, use_cache=False, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_loss_and_grads(loss, grads, ref_loss, ref_grads):
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def labels_with_ignored(x):
    labels = x.clone()
    labels[0, :3] = -100  # a masked prompt: ignored positions must not count in the mean
    return labels


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_lm_loss_is_fused_in_training_with_the_same_loss_and_gradients(family):
    model = tiny_model(family).train()
    x = ids()
    labels = labels_with_ignored(x)
    ref, ref_grads = lm_loss_and_grads(model, x, labels)
    with metalcore.patch(model) as handle, OpCounter() as counter:
        assert handle.patched["lm_loss"] == ["<root>"]
        out, grads = lm_loss_and_grads(model, x, labels)
    # One op for the head and the loss, and the logits never materialized.
    assert counter.counts["fused_linear_cross_entropy"] == 1
    assert counter.counts["fused_linear_cross_entropy_backward"] == 1
    assert out.logits is None and out.loss.dtype == torch.float32
    assert_same_loss_and_grads(out.loss, grads, ref.loss, ref_grads)


def test_lm_loss_with_num_items_in_batch_sums_then_divides_as_transformers():
    # The Trainer's gradient accumulation passes num_items_in_batch: loss = sum / that count.
    model = tiny_model("llama").train()
    x = ids()
    labels = labels_with_ignored(x)
    ref, ref_grads = lm_loss_and_grads(model, x, labels, num_items_in_batch=torch.tensor(40))
    with metalcore.patch(model):
        out, grads = lm_loss_and_grads(model, x, labels, num_items_in_batch=torch.tensor(40))
    assert out.logits is None
    assert_same_loss_and_grads(out.loss, grads, ref.loss, ref_grads)


def test_lm_loss_keeps_logits_in_eval_and_without_labels():
    model = tiny_model("llama").eval()
    x = ids()
    labels = labels_with_ignored(x)
    with torch.no_grad():
        ref = model(input_ids=x, labels=labels, use_cache=False)
        with metalcore.patch(model), OpCounter() as counter:
            evaluated = model(input_ids=x, labels=labels, use_cache=False)
            generated = model.train()(input_ids=x, use_cache=False)  # no labels: logits
    assert counter.counts["fused_linear_cross_entropy"] == 0
    torch.testing.assert_close(evaluated.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(evaluated.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert generated.logits.shape == (*x.shape, 128)


def test_lm_loss_can_be_left_alone():
    model = tiny_model("llama").train()
    with metalcore.patch(model, lm_loss=False) as handle, OpCounter() as counter:
        out = model(input_ids=ids(), labels=ids(), use_cache=False)
    assert "lm_loss" not in handle.patched and out.logits is not None
    assert counter.counts["fused_linear_cross_entropy"] == 0


def padded_batch():
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :4] = 0  # a left-padded row: the mask path, not the causal flag
    return x, mask


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("mistral", {"sliding_window": 5})])
def test_attention_backend_matches_sdpa_with_padding_and_windows(family, overrides):
    model = tiny_model(family, attn_implementation="sdpa", **overrides).train()
    x, mask = padded_batch()

    def run():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=x, attention_mask=mask, use_cache=False).logits
        # Padded query rows see nothing real; compare the rows a user reads.
        out = out * mask[..., None]
        out.pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_out, ref_grads = run()
    with metalcore.patch(model, rmsnorm=False, rope=False, mlp=False) as handle:
        assert handle.patched["attention"] == [type(model).__name__]
        assert model.config._attn_implementation == "metalcore"
        with OpCounter() as counter:
            out, grads = run()
    assert model.config._attn_implementation == "sdpa"  # undo restored it
    assert counter.counts["attention"] == 2 and counter.counts["attention_backward"] == 2
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_attention_backend_generates_the_same_tokens_with_a_cache():
    # Prefill (causal flag) then decode steps (one query against the cache, GQA).
    model = tiny_model("llama", attn_implementation="sdpa").eval()
    x, mask = padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    ref = model.generate(x, **kw)
    with metalcore.patch(model), OpCounter() as counter:
        out = model.generate(x, **kw)
    assert counter.counts["attention"] >= 2 * 5
    assert torch.equal(out, ref)


def tiny_gpt2(seed=0):
    import transformers as tf

    cfg = tf.GPT2Config(
        vocab_size=128,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        attn_implementation="eager",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    model = tf.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial affine parameters, so a dropped weight or bias would show
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    return model


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=inputs, labels=inputs, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_tiny_gpt2_same_loss_and_gradients_patched():
    model = tiny_gpt2()
    x = ids()
    ref_loss, ref_grads = loss_and_grads(model, x)
    handle = metalcore.patch(model)
    # 2 layers x (ln_1, ln_2) + ln_f
    assert handle.patched["layer_norm"] == [
        "transformer.h.0.ln_1",
        "transformer.h.0.ln_2",
        "transformer.h.1.ln_1",
        "transformer.h.1.ln_2",
        "transformer.ln_f",
    ]
    with OpCounter() as counter:
        loss, grads = loss_and_grads(model, x)
    assert counter.counts["layer_norm"] == 5 and counter.counts["layer_norm_backward"] == 5
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    handle.undo()
    assert all("forward" not in m.__dict__ for m in model.modules())
    torch.testing.assert_close(loss_and_grads(model, x)[0], ref_loss, rtol=0, atol=0)


def test_tiny_bert_layer_norms_are_patched():
    import transformers as tf

    cfg = tf.BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = tf.BertModel(cfg).eval()
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x).last_hidden_state
    handle = metalcore.patch(model)
    assert len(handle.patched["layer_norm"]) == 5  # embeddings + 2 per layer
    with OpCounter() as counter, torch.no_grad():
        after = model(input_ids=x).last_hidden_state
    assert counter.counts["layer_norm"] == 5
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    handle.undo()
    # layer_norm=False leaves them alone (and does not report them as unknown norms).
    handle = metalcore.patch(model, layer_norm=False)
    assert "layer_norm" not in handle.patched and handle.skipped == {}
    handle.undo()


def test_compile_fullgraph_of_patched_gpt2():
    # Logits only: transformers' own loss path logs a warning that torch.compile cannot trace.
    model = tiny_gpt2()
    x = ids()
    ref_out, ref_grads = logits_and_grads(model, x)
    handle = metalcore.patch(model)
    graphs = []
    compiled = torch.compile(model, fullgraph=True, backend=_recording_backend(graphs))
    compiled.zero_grad(set_to_none=True)
    out = compiled(input_ids=x, use_cache=False).logits
    out.float().pow(2).mean().backward()
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    for op in ("layer_norm", "layer_norm_backward"):
        assert f"metalcore.{op}.default" in targets, op
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    handle.undo()


def test_compile_fullgraph_of_patched_training_step_with_attention_and_lm_loss():
    # The attention backend and the fused head + loss trace without a graph break.
    model = tiny_model("llama", attn_implementation="sdpa").train()
    x = ids()
    ref = model(input_ids=x, labels=x, use_cache=False).loss
    with metalcore.patch(model) as handle:
        assert {"attention", "lm_loss"} <= handle.patched.keys()
        out = torch.compile(model, fullgraph=True)(input_ids=x, labels=x, use_cache=False)
        out.loss.backward()
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    assert all(p.grad is not None for p in model.parameters())
