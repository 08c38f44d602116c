"""Weight-only quantization beyond the op contract: byte-exactness of the GGUF quantizers and
dequantizers (against the NumPy reference written from the block layouts, and against the
``gguf`` package where it is installed), MLX's affine rule, the linear ops against float64
dequantize-then-matmul, the Python API's errors, and the modules (state_dict, a .gguf file,
compile, export)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import metalcore
from metalcore import quant
from metalcore.nn import GGUFLinear, Int4Linear, Int8Linear
from metalcore.testing import reference as ref
from metalcore.testing.op_specs import _gguf_data
from tests.support import export_roundtrip

QTYPES = {"Q4_0": 2, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}
# Bytes per weight of each type's rows, as a divisor: row_bytes // this = in_features.
GGUF_ROW_BYTES = {2: 18 / 32, 8: 34 / 32, 12: 144 / 256, 14: 210 / 256}


def _distributions(rows: int = 8, k: int = 256) -> dict[str, np.ndarray]:
    """Weights that stress the quantizers' rounding and tie rules."""
    rng = np.random.default_rng(0)
    ties = np.round(rng.standard_normal((rows, k)) * 8) / 2  # exact .5 steps
    signed_ties = rng.standard_normal((rows, k))
    signed_ties[:, 3] = 2.0  # +-amax in one block: the first one wins
    signed_ties[:, 9] = -2.0
    special = rng.standard_normal((rows, k))
    special[0, :32] = 0.0  # an all-zero block
    special[1, :32] = 0.25  # a constant block
    special[2, :64] = -np.abs(special[2, :64])  # all-negative blocks
    special[3, 5] = 1e4  # an outlier
    return {
        "normal": rng.standard_normal((rows, k)),
        "uniform": rng.uniform(-1, 1, (rows, k)),
        "student_t": rng.standard_t(2, (rows, k)),
        "ties": ties,
        "signed_ties": signed_ties,
        "special": special,
        "tiny": rng.standard_normal((rows, k)) * 1e-6,
    }


@pytest.mark.parametrize("name", ["Q4_0", "Q8_0"])
def test_quantize_gguf_is_byte_exact(name):
    """Every distribution gives llama.cpp's reference-quantizer bytes (NumPy port), and the
    gguf package's where it is installed."""
    try:
        import gguf
    except ImportError:
        gguf = None
    for label, w in _distributions().items():
        w32 = w.astype(np.float32)
        got = quant.quantize_gguf(torch.from_numpy(w32), name).numpy()
        assert np.array_equal(got, ref.gguf_quantize(w32, QTYPES[name])), label
        if gguf is not None:
            want = gguf.quants.quantize(w32, gguf.GGMLQuantizationType[name])
            assert np.array_equal(got, want), label


@pytest.mark.parametrize("name", list(QTYPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dequantize_gguf_exact(name, dtype):
    """Random valid blocks decode to exactly llama.cpp's values (rounded once to dtype)."""
    data = _gguf_data(3, QTYPES[name], 7, 2)
    want = ref.gguf_dequantize(data, QTYPES[name])
    got = quant.dequantize_gguf(data, name, dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want.to(dtype), rtol=0, atol=0)
    try:
        import gguf
    except ImportError:
        return
    theirs = gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[name])
    assert np.array_equal(quant.dequantize_gguf(data, name).numpy(), theirs)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_affine_quantizer_follows_mlx(bits, group):
    w = torch.from_numpy(_distributions(4, 256)["special"].astype(np.float32))
    fn = quant.quantize_int4 if bits == 4 else quant.quantize_int8
    q, s, b = fn(w, group, dtype=torch.float32)
    codes, scales, biases = ref.mlx_affine_quantize(w, group, bits)
    got_codes = q.to(torch.int64)
    if bits == 4:
        got_codes = torch.stack([got_codes & 15, got_codes >> 4], -1).reshape(4, 256)
    assert np.array_equal(got_codes.numpy(), codes)
    assert np.array_equal(s.numpy(), scales) and np.array_equal(b.numpy(), biases)
    # The reconstruction error: half a step, or a step and a half where the stretched scale
    # (MLX's exact-edge rule) clamps the far edge.
    deq = (quant.dequantize_int4 if bits == 4 else quant.dequantize_int8)(q, s, b, group)
    step = s.abs().repeat_interleave(group, dim=1)
    assert bool(((deq - w).abs() <= 1.5 * step + 1e-6).all())


@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("name", list(QTYPES))
def test_gguf_linear_matches_float64(m, name):
    """x @ dequantize(W).T in float64, within float32 accumulation error, for decode (m = 1, 7)
    and prefill (m = 64) sizes, batched x, with a bias."""
    data = _gguf_data(5, QTYPES[name], 33, 2)
    w64 = ref.gguf_dequantize(data, QTYPES[name])
    x = torch.randn(2, m, w64.shape[1], dtype=torch.float64)
    bias = torch.randn(33)
    y = quant.gguf_linear(x.float(), data, name, bias)
    want = x @ w64.t() + bias.double()
    scale = x.abs() @ w64.abs().t() + 1
    assert y.shape == (2, m, 33)
    assert bool(((y.double() - want).abs() <= 1e-5 * scale).all())


def test_our_error_is_within_twice_a_bf16_linear():
    """bf16 activations: our error against float64 is at most twice F.linear's on the
    dequantized weight in bf16 (the guide's rule)."""
    w = torch.randn(96, 512)
    q, s, b = quant.quantize_int4(w, 64, dtype=torch.bfloat16)
    w64 = ref.affine_dequantize(q, s, b, 64, 4)
    x = torch.randn(16, 512, dtype=torch.bfloat16)
    want = x.double() @ w64.t()
    ours = (quant.int4_linear(x, q, s, b, 64).double() - want).abs().mean()
    torch_err = (torch.nn.functional.linear(x, w64.to(torch.bfloat16)).double() - want).abs()
    assert ours <= 2 * torch_err.mean()


def test_python_api_errors():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match=r"metalcore\.quantize_int4: 'group_size' must be"):
        quant.quantize_int4(w, 48)
    with pytest.raises(ValueError, match=r"in_features \(64\) must be a multiple of"):
        quant.quantize_int8(w, 128)
    with pytest.raises(ValueError, match=r"contains NaN or Inf"):
        quant.quantize_gguf(torch.full((1, 32), float("nan")), "Q4_0")
    with pytest.raises(NotImplementedError, match=r"quantizing to Q4_K is not implemented"):
        quant.quantize_gguf(torch.randn(1, 256), "Q4_K")
    with pytest.raises(ValueError, match=r"unsupported GGUF type 'Q5_1'"):
        quant.quantize_gguf(w, "Q5_1")
    with pytest.raises(TypeError, match=r"'weight' must be a floating-point tensor"):
        quant.quantize_int4(torch.ones(4, 64, dtype=torch.int32))


def test_frozen_scales_are_an_error():
    q, s, b = quant.quantize_int4(torch.randn(8, 64), 32, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"'scales' requires grad, but quantized weights"):
        quant.int4_linear(torch.randn(2, 64), q, s.requires_grad_(), b, 32)


@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear])
def test_affine_module(cls):
    lin = torch.nn.Linear(128, 48)
    mod = cls.from_float(lin, group_size=32)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = mod(x)
    twin = torch.nn.functional.linear(x, mod.dequantize().float(), mod.bias.float())
    torch.testing.assert_close(y, twin, rtol=1e-4, atol=1e-4)
    # Activation gradient only (the LoRA case): ones @ W.
    y.sum().backward()
    torch.testing.assert_close(
        x.grad, mod.dequantize().float().sum(0).expand_as(x), rtol=1e-4, atol=1e-4
    )
    # state_dict round trip into a fresh (meta-built, assigned) module.
    sd = mod.state_dict()
    assert set(sd) == {"qweight", "scales", "biases", "bias"}
    with torch.device("meta"):
        fresh = cls(128, 48, True, 32, mod.scales.dtype)
    fresh.load_state_dict(sd, assign=True)
    torch.testing.assert_close(fresh(x.detach()), y.detach())
    with pytest.raises(RuntimeError, match="size mismatch"):
        cls(128, 48, True, 64, mod.scales.dtype).load_state_dict(sd)


def test_gguf_file_to_module(tmp_path):
    """GGUFWriter -> file -> GGUFReader -> GGUFLinear gives the writer's dequantized weights."""
    gguf = pytest.importorskip("gguf")
    w = np.random.default_rng(1).standard_normal((24, 64)).astype(np.float32)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, qt in (
        ("q4", gguf.GGMLQuantizationType.Q4_0),
        ("q8", gguf.GGMLQuantizationType.Q8_0),
    ):
        writer.add_tensor(name, gguf.quants.quantize(w, qt), raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        mod = GGUFLinear.from_gguf(t)
        assert (mod.in_features, mod.out_features) == (64, 24)
        want = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        assert np.array_equal(mod.dequantize().numpy(), want.reshape(24, 64))
        x = torch.randn(3, 64)
        torch.testing.assert_close(mod(x), x @ torch.from_numpy(want.reshape(24, 64)).t())


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Int4Linear.from_float(torch.nn.Linear(64, 96), group_size=32)
        self.b = GGUFLinear.from_float(torch.nn.Linear(96, 32, bias=False), "Q8_0")

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_compile_fullgraph_dynamic():
    model = _Tiny()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for m in (1, 5, 17):
        x = torch.randn(m, 64)
        torch.testing.assert_close(compiled(x), model(x))


def test_export_save_load_fresh_process(tmp_path):
    model = _Tiny()
    m = torch.export.Dim("m", min=2)
    export_roundtrip(
        model,
        (torch.randn(4, 64),),
        ({0: m},),
        (torch.randn(9, 64),),
        tmp_path,
        ["metalcore.int4_linear", "metalcore.gguf_linear"],
    )


def test_top_level_names():
    assert metalcore.quantize_int4 is quant.quantize_int4
    assert metalcore.nn.Int4Linear is Int4Linear


def _tiny_llama():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("scheme", ["int4", "Q4_0"])
def test_quantize_hf_model_in_place(scheme):
    """A tiny HF Llama quantized in place matches its dequantized twin (the same model with
    every quantized layer's weight replaced by its dequantized value), and undo restores it."""
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    originals = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    handle = metalcore.quant.quantize_model(model, scheme, group_size=32)
    assert "lm_head" in handle.skipped and len(handle.replaced) == 2 * 7
    twin = _tiny_llama()
    twin.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k in twin.state_dict()}, strict=False
    )
    with torch.no_grad():
        for name in handle.replaced:
            twin.get_submodule(name).weight.copy_(model.get_submodule(name).dequantize().float())
        got, want = model(ids).logits, twin(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.equal(got, before)  # lossy, so the outputs did change
    handle.undo()
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_load_gguf_linears(tmp_path):
    """Tensors of a .gguf file, mapped by name onto a model's linear layers, run as they are."""
    gguf = pytest.importorskip("gguf")
    model = _tiny_llama()
    names = {"model.layers.0.self_attn.q_proj": "blk.0.attn_q.weight"}
    names["model.layers.1.mlp.down_proj"] = "blk.1.ffn_down.weight"
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    qt = gguf.GGMLQuantizationType.Q8_0
    for module, tensor in names.items():
        w = model.get_submodule(module).weight.detach().numpy()
        writer.add_tensor(tensor, gguf.quants.quantize(w, qt), raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    handle = metalcore.quant.load_gguf_linears(model, path, names)
    assert handle.replaced == list(names)
    for module in names:
        layer = model.get_submodule(module)
        assert isinstance(layer, GGUFLinear)
        x = torch.randn(3, layer.in_features)
        torch.testing.assert_close(layer(x), x @ layer.dequantize().t())
    handle.undo()
    assert all(type(model.get_submodule(m)) is torch.nn.Linear for m in names)


# Inputs come from the parent process: torch's own random generators are vectorized per
# capability too, so drawing them in each child would give each build other data.
_CAPABILITY_SCRIPT = """
import sys, torch, metalcore
inputs = torch.load(sys.argv[1])
out = {}
for name, (qt, data, xs) in inputs["gguf"].items():
    out[name] = metalcore.quant.dequantize_gguf(data, qt)
    for i, x in enumerate(xs):
        out[f"{name}_{i}"] = metalcore.quant.gguf_linear(x, data, qt)
for bits, (q, s, b, xs) in inputs["affine"].items():
    deq = metalcore.quant.dequantize_int4 if bits == 4 else metalcore.quant.dequantize_int8
    lin = metalcore.quant.int4_linear if bits == 4 else metalcore.quant.int8_linear
    out[f"int{bits}"] = deq(q, s, b, 64)
    for i, x in enumerate(xs):
        out[f"int{bits}_{i}"] = lin(x, q, s, b, 64)
torch.save(out, sys.argv[2])
"""


def test_every_cpu_capability_agrees(tmp_path):
    """The default, AVX2 and AVX-512 builds of the decoders (intrinsics in the last two) give
    the same weights: bit for bit for GGUF (exact products), within float rounding for the
    affine formats (FMA or not), and the same matmuls within float32 accumulation error."""
    import os
    import subprocess
    import sys

    from tests.support import REPO

    g = torch.Generator().manual_seed(0)
    xs = lambda k: [torch.randn(m, k, generator=g) for m in (1, 5, 12)]  # noqa: E731
    inputs = {"gguf": {}, "affine": {}}
    for name, qt in QTYPES.items():
        data = _gguf_data(11, qt, 13, 2)
        inputs["gguf"][name] = (qt, data, xs(int(data.shape[1] / GGUF_ROW_BYTES[qt])))
    w = torch.randn(13, 256, generator=g)
    for bits in (4, 8):
        fn = quant.quantize_int4 if bits == 4 else quant.quantize_int8
        inputs["affine"][bits] = (*fn(w, 64, dtype=torch.float32), xs(256))
    torch.save(inputs, tmp_path / "inputs.pt")
    results = {}
    for cap in ("default", "avx2", "avx512"):
        path = tmp_path / f"{cap}.pt"
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap, PYTHONPATH=str(REPO))
        args = [sys.executable, "-c", _CAPABILITY_SCRIPT, str(tmp_path / "inputs.pt"), str(path)]
        subprocess.run(args, check=True, env=env)
        results[cap] = torch.load(path)
    base = results["avx512"]
    for cap in ("default", "avx2"):
        for key, value in results[cap].items():
            if key in QTYPES:
                assert torch.equal(value, base[key]), (cap, key)
            else:
                # Vector widths differ (16, 8 or 1 lanes), so summation orders do.
                atol = 1e-5 * float(base[key].abs().max()) + 1e-6
                torch.testing.assert_close(value, base[key], rtol=1e-4, atol=atol, msg=(cap, key))
