"""lora_linear beyond the op contract (tests/ops/test_contract.py runs numerics, gradients,
gradcheck, opcheck, compile, export and bad inputs from the spec): PEFT's formulation through
torch.nn.Linear modules as the reference, the base weight's gradient only when it requires grad,
metalcore.nn.LoRALinear (its own layers and a PEFT-style layer's), no Metal kernel, and a
LayerNorm -> LoRA linear -> cross-entropy chain that compiles to metalcore ops with no graph
break and eager's gradients."""

import pytest
import torch

import metalcore
from metalcore.nn import LoRALinear
from tests.support import seeded


def _peft_style(x, base, lora_a, lora_b, scaling):
    """PEFT's lora.Linear forward: base(x) + lora_B(lora_A(x)) * scaling."""
    return base(x) + lora_b(lora_a(x)) * scaling


def _modules(k, n, r, dtype, seed, bias=True):
    torch.manual_seed(seed)
    base = torch.nn.Linear(k, n, bias=bias, dtype=dtype)
    lora_a = torch.nn.Linear(k, r, bias=False, dtype=dtype)
    lora_b = torch.nn.Linear(r, n, bias=False, dtype=dtype)
    torch.nn.init.normal_(lora_b.weight)  # PEFT starts B at zero; the test wants a live path
    return base, lora_a, lora_b


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("freeze_base", [True, False])
def test_matches_peft_formulation_float64(bias, freeze_base):
    base, lora_a, lora_b = _modules(48, 40, 8, torch.float64, seed=0, bias=bias)
    base.weight.requires_grad_(not freeze_base)
    x = seeded(3, 7, 48, dtype=torch.float64, seed=1).requires_grad_()
    scaling = 2.0
    bias_t = base.bias
    got = metalcore.lora_linear(x, base.weight, lora_a.weight, lora_b.weight, scaling, bias_t)
    want = _peft_style(x, base, lora_a, lora_b, scaling)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = seeded(*want.shape, dtype=torch.float64, seed=2)
    leaves = [x, lora_a.weight, lora_b.weight]
    leaves += [base.weight] if not freeze_base else []
    leaves += [base.bias] if bias else []
    for a, b in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_frozen_base_weight_gets_no_gradient_and_no_product():
    base, lora_a, lora_b = _modules(16, 12, 4, torch.float32, seed=3)
    base.weight.requires_grad_(False)
    x = seeded(5, 16, seed=4)
    out = metalcore.lora_linear(x, base.weight, lora_a.weight, lora_b.weight, 0.5, base.bias)
    out.sum().backward()
    assert base.weight.grad is None
    assert lora_a.weight.grad is not None and lora_b.weight.grad is not None
    # The backward op, asked for no weight gradient, returns an empty one (no [out, in] product).
    with torch.no_grad():
        grads = torch.ops.metalcore.lora_linear_backward(
            torch.ones(5, 12), x, base.weight, lora_a.weight, lora_b.weight, 0.5, base.bias, False
        )
    assert grads[1].shape == (0,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_peft_own_error(dtype):
    # PEFT in the same dtype rounds the base output, the [.., r] activations, the scaled update
    # and the sum; the op rounds three of those: it must be at least as close to float64.
    base, lora_a, lora_b = _modules(256, 128, 16, torch.float64, seed=5)
    x = seeded(64, 256, dtype=torch.float64, seed=6)
    want = _peft_style(x, base, lora_a, lora_b, 2.0).detach()
    lp = [m.to(dtype) for m in (base, lora_a, lora_b)]
    xl = x.to(dtype)
    got = metalcore.lora_linear(xl, lp[0].weight, lp[1].weight, lp[2].weight, 2.0, lp[0].bias)
    theirs = _peft_style(xl, *lp, 2.0)
    err = (got.double() - want).abs().max()
    err_torch = (theirs.double() - want).abs().max()
    assert err <= 1.5 * err_torch, (float(err), float(err_torch))


def test_lora_linear_module_starts_as_the_base_layer_and_trains_the_adapter():
    torch.manual_seed(7)
    base = torch.nn.Linear(20, 10)
    module = LoRALinear(base, r=4, alpha=8)
    assert module.scaling == 2.0
    assert not base.weight.requires_grad and not base.bias.requires_grad
    x = seeded(6, 20, seed=8)
    torch.testing.assert_close(module(x), base(x))  # lora_B starts at zero, as PEFT's
    module(x).pow(2).sum().backward()
    assert module.lora_B.weight.grad is not None and module.lora_B.weight.grad.abs().sum() > 0
    assert base.weight.grad is None
    names = {name for name, _ in module.named_parameters()}
    assert names == {"base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight"}


class _PeftLikeLayer(torch.nn.Module):
    """The attributes of PEFT's lora.Linear that LoRALinear.from_peft reads (PEFT itself is not
    a dependency): base_layer, per-adapter lora_A / lora_B / lora_dropout ModuleDicts, a scaling
    dict and the active adapter."""

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(base.in_features, r, False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(r, base.out_features, False)})
        torch.nn.init.normal_(self.lora_B["default"].weight)
        drop = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        self.lora_dropout = torch.nn.ModuleDict({"default": drop})
        self.scaling = {"default": alpha / r}
        self.active_adapters = ["default"]

    def forward(self, x):
        a, b = self.lora_A["default"], self.lora_B["default"]
        drop = self.lora_dropout["default"]
        return self.base_layer(x) + b(a(drop(x))) * self.scaling["default"]


def test_from_peft_shares_parameters_and_matches_the_layer():
    torch.manual_seed(9)
    layer = _PeftLikeLayer(torch.nn.Linear(24, 18), r=6, alpha=12)
    module = LoRALinear.from_peft(layer)
    assert module.lora_A.weight is layer.lora_A["default"].weight
    assert module.base_layer is layer.base_layer
    x = seeded(2, 5, 24, seed=10).requires_grad_()
    torch.testing.assert_close(module(x), layer(x), rtol=1e-5, atol=1e-5)
    g = seeded(2, 5, 18, seed=11)
    leaves = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    ours = torch.autograd.grad(module(x), leaves, g)
    theirs = torch.autograd.grad(layer(x), leaves, g)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"no adapter 'other'"):
        LoRALinear.from_peft(layer, adapter="other")


def test_dropout_in_training_runs_the_unfused_math():
    torch.manual_seed(12)
    layer = _PeftLikeLayer(torch.nn.Linear(8, 8), r=2, alpha=2, dropout=0.5)
    module = LoRALinear.from_peft(layer).train()
    x = seeded(4, 8, seed=13)
    torch.manual_seed(14)
    got = module(x)
    torch.manual_seed(14)
    torch.testing.assert_close(got, layer.train()(x))
    module.eval()
    layer.eval()
    torch.testing.assert_close(module(x), layer(x), rtol=1e-5, atol=1e-5)


def test_no_metal_kernel_so_mps_calls_raise_not_implemented():
    # The low-rank products would need a Metal matmul, which msim cannot run: the op has no MPS
    # kernel, and an MPS call is the dispatcher's NotImplementedError naming the op.
    for op in ("lora_linear", "lora_linear_backward"):
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"metalcore::{op}", "MPS")


def test_layer_norm_lora_cross_entropy_chain_compiles_to_metalcore_ops():
    torch.manual_seed(15)
    hidden, vocab, r = 32, 50, 4
    ln = metalcore.nn.LayerNorm(hidden)
    head = LoRALinear(torch.nn.Linear(hidden, vocab), r=r, alpha=8)
    torch.nn.init.normal_(head.lora_B.weight)
    x = seeded(2, 9, hidden, seed=16).requires_grad_()
    target = torch.randint(0, vocab, (18,), generator=torch.Generator().manual_seed(17))

    def loss_fn(x):
        logits = head(ln(x))
        return metalcore.cross_entropy(logits.reshape(-1, vocab), target)

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    params = [x, ln.weight, ln.bias, head.lora_A.weight, head.lora_B.weight]
    got = compiled(x)
    got_grads = torch.autograd.grad(got, params)
    want = loss_fn(x)
    want_grads = torch.autograd.grad(want, params)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
    assert len(graphs) == 1  # fullgraph: one graph, no break
    called = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    for op in ("layer_norm", "lora_linear", "cross_entropy"):
        assert any(f"metalcore.{op}" in t for t in called), (op, called)
    # No op of the chain fell back to aten's own linear, layer norm or loss.
    assert not any(("linear" in t or "layer_norm" in t) and "metalcore" not in t for t in called)

    # Through AOT autograd the backward graph holds the metalcore backward ops.
    from torch._functorch.aot_autograd import aot_module_simplified

    fwd_bwd = []

    def aot_backend(gm, example_inputs):
        def keep(g, _):
            fwd_bwd.append(g)
            return g.forward

        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=aot_backend)
    got_grads = torch.autograd.grad(compiled(x), params)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
    bwd = {str(n.target) for n in fwd_bwd[-1].graph.nodes if n.op == "call_function"}
    for op in ("layer_norm_backward", "lora_linear_backward", "cross_entropy_backward"):
        assert any(f"metalcore.{op}" in t for t in bwd), (op, bwd)
