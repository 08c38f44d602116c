"""Weight-only quantization: quantizers, GGUF blocks, and the quantized linear ops' wrappers.

Two families of formats, both stored as plain, device-independent tensors (the same bytes on
every device and CPU instruction set, so ``state_dict`` files are portable):

* **Affine INT4 / INT8** (MLX's layout and quantizer): ``qweight`` uint8 ``[N, K/2]`` (INT4,
  element ``2i`` in the low nibble of byte ``i``, ``2i + 1`` in the high one) or ``[N, K]``
  (INT8); ``scales`` and ``biases`` ``[N, K/group_size]``; ``w = scale * q + bias`` with
  ``q`` in ``[0, 15]`` or ``[0, 255]``. Groups run along K (in_features).
* **GGUF blocks** (llama.cpp's Q4_0, Q8_0, Q4_K, Q6_K): ``data`` uint8 ``[N, K/block *
  type_size]``, a ``.gguf`` tensor's bytes unchanged. :func:`quantize_gguf` writes Q4_0 and
  Q8_0 byte for byte as llama.cpp's reference quantizer (and the ``gguf`` package) do; Q4_K and
  Q6_K bytes (from a ``.gguf`` file) are dequantized and multiplied, not produced.

Quantizing is a one-time step done here with plain torch ops on the weight's device;
dequantizing and the matmuls are ``torch.ops.metalcore`` ops with CPU kernels, fakes and
autograd for the activation (weights are frozen, so LoRA-style training on top works).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = [
    "GGUF_TYPES",
    "QuantizeHandle",
    "dequantize_gguf",
    "dequantize_int4",
    "dequantize_int8",
    "gguf_linear",
    "gguf_qtype",
    "int4_linear",
    "int8_linear",
    "load_gguf_linears",
    "quantize_gguf",
    "quantize_int4",
    "quantize_int8",
    "quantize_model",
]

# ggml type name -> (ggml type id, weights per block, bytes per block).
GGUF_TYPES = {
    "Q4_0": (2, 32, 18),
    "Q8_0": (8, 32, 34),
    "Q4_K": (12, 256, 144),
    "Q6_K": (14, 256, 210),
}
_GGUF_BY_ID = {v[0]: (name, *v[1:]) for name, v in GGUF_TYPES.items()}
GROUP_SIZES = (32, 64, 128)


def gguf_qtype(qtype) -> int:
    """The ggml type id of ``qtype``: an id (2, 8, 12, 14), a name ("Q4_0") or a
    ``gguf.GGMLQuantizationType`` member."""
    if isinstance(qtype, str):
        if qtype.upper() not in GGUF_TYPES:
            raise ValueError(
                f"metalcore.quant: unsupported GGUF type {qtype!r}; supported: "
                f"{', '.join(GGUF_TYPES)}"
            )
        return GGUF_TYPES[qtype.upper()][0]
    return int(qtype)


def _check_weight(op: str, weight: torch.Tensor, multiple: int, what: str) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"metalcore.{op}: 'weight' must be a floating-point tensor, got {got}")
    if weight.dim() != 2:
        raise ValueError(
            f"metalcore.{op}: 'weight' must be 2-D [out_features, in_features], got shape "
            f"{list(weight.shape)}"
        )
    if weight.shape[1] % multiple != 0:
        raise ValueError(
            f"metalcore.{op}: in_features ({weight.shape[1]}) must be a multiple of {what} "
            f"({multiple})"
        )
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"metalcore.{op}: 'weight' contains NaN or Inf")
    return weight.detach().to(torch.float32)


# --- Affine INT4 / INT8 --------------------------------------------------------------------


def _quantize_affine(op: str, weight, group_size: int, bits: int, dtype):
    if group_size not in GROUP_SIZES:
        raise ValueError(f"metalcore.{op}: 'group_size' must be 32, 64 or 128, got {group_size}")
    w = _check_weight(op, weight, group_size, "'group_size'")
    if dtype is None:
        dtype = weight.dtype if weight.dtype != torch.float64 else torch.float32
    n, k = w.shape
    levels = float(2**bits - 1)
    g = w.reshape(n, k // group_size, group_size)
    hi = g.amax(dim=-1)
    lo = g.amin(dim=-1)
    # MLX's rule: the group edge of larger magnitude is represented exactly (it becomes the
    # bias, at code 0), and the scale is stretched so that zero is exact too (a whole number
    # of steps from that edge). The scale is negative when the edge is the maximum.
    s0 = ((hi - lo) / levels).clamp_min(1e-7)
    use_lo = lo.abs() > hi.abs()
    edge = torch.where(use_lo, lo, hi)
    s = torch.where(use_lo, s0, -s0)
    q0 = torch.round(edge / s)
    exact = q0 != 0
    s = torch.where(exact, edge / torch.where(exact, q0, torch.ones_like(q0)), s)
    b = torch.where(exact, edge, torch.zeros_like(edge))
    q = torch.round((g - b.unsqueeze(-1)) / s.unsqueeze(-1)).clamp(0, levels).to(torch.uint8)
    q = q.reshape(n, k)
    if bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    return q.contiguous(), s.to(dtype).contiguous(), b.to(dtype).contiguous()


def quantize_int4(weight: torch.Tensor, group_size: int = 64, dtype: torch.dtype | None = None):
    """Affine 4-bit quantization of ``weight`` [N, K] in groups of ``group_size`` along K.

    Returns ``(qweight, scales, biases)``: uint8 ``[N, K/2]`` and two ``[N, K/group_size]``
    tensors in ``dtype`` (default: the weight's dtype, float32 for float64), with MLX's layout
    and quantization rule (``mx.quantize(w, group_size, bits=4)``). K must be a multiple of
    ``group_size`` (32, 64 or 128); NaN or Inf weights are an error."""
    return _quantize_affine("quantize_int4", weight, group_size, 4, dtype)


def quantize_int8(weight: torch.Tensor, group_size: int = 64, dtype: torch.dtype | None = None):
    """Affine 8-bit quantization: as :func:`quantize_int4` with codes 0..255 and ``qweight``
    uint8 ``[N, K]``."""
    return _quantize_affine("quantize_int8", weight, group_size, 8, dtype)


def dequantize_int4(qweight, scales, biases, group_size: int) -> torch.Tensor:
    """The float weight [N, K] (in scales' dtype) of an affine INT4 weight."""
    return torch.ops.metalcore.int4_dequantize(qweight, scales, biases, group_size)


def dequantize_int8(qweight, scales, biases, group_size: int) -> torch.Tensor:
    """The float weight [N, K] (in scales' dtype) of an affine INT8 weight."""
    return torch.ops.metalcore.int8_dequantize(qweight, scales, biases, group_size)


def int4_linear(input, qweight, scales, biases, group_size: int, bias=None) -> torch.Tensor:
    """``input @ W.T + bias`` with W affine INT4; input [..., K] of any float dtype, output
    [..., N] in input's dtype (float32 accumulation). Differentiable in input and bias."""
    return torch.ops.metalcore.int4_linear(input, qweight, scales, biases, group_size, bias)


def int8_linear(input, qweight, scales, biases, group_size: int, bias=None) -> torch.Tensor:
    """As :func:`int4_linear` for an affine INT8 weight."""
    return torch.ops.metalcore.int8_linear(input, qweight, scales, biases, group_size, bias)


# --- GGUF --------------------------------------------------------------------------------------


def _c_roundf(v: torch.Tensor) -> torch.Tensor:
    """C's roundf (ties away from zero) of float32 values, exactly: |v| + 0.5 in float64 is exact,
    where float32 arithmetic could round 0.49999997 + 0.5 up to 1."""
    a = v.double()
    return torch.sign(a) * torch.floor(a.abs() + 0.5)


def _quantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # llama.cpp's quantize_row_q8_0_ref: d = amax / 127, q = roundf(x / d) via x * (1 / d).
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = _c_roundf(blocks * inv).to(torch.int8)
    return torch.cat([d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)], dim=-1)


def _quantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # quantize_row_q4_0_ref: the element of largest magnitude (the first on ties) keeps its
    # sign and maps to code 0: d = max / -8; codes are min(15, trunc(x / d + 8.5)), both
    # steps rounded in float32 as the C code does.
    idx = blocks.abs().argmax(dim=-1, keepdim=True)
    d = blocks.gather(-1, idx) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.trunc(blocks * inv + 8.5).clamp(0, 15).to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)
    return torch.cat([d.to(torch.float16).view(torch.uint8), packed], dim=-1)


def quantize_gguf(weight: torch.Tensor, qtype) -> torch.Tensor:
    """GGUF blocks of ``weight`` [N, K]: uint8 ``[N, K/32 * type_size]``, byte-identical to
    llama.cpp's reference quantizer (without an importance matrix) and to the ``gguf``
    package's ``quants.quantize``. ``qtype``: "Q4_0" / 2 or "Q8_0" / 8. K-quant quantizers are
    not implemented (their bytes depend on an iterative fit; dequantizing them works)."""
    t = gguf_qtype(qtype)
    if t not in (2, 8):
        name = _GGUF_BY_ID.get(t, (str(t),))[0]
        raise NotImplementedError(
            f"metalcore.quantize_gguf: quantizing to {name} is not implemented (Q4_0 and Q8_0 "
            "are); its blocks can still be dequantized and multiplied"
        )
    w = _check_weight("quantize_gguf", weight, 32, "the block size")
    n, k = w.shape
    blocks = w.reshape(n, k // 32, 32)
    out = _quantize_q4_0(blocks) if t == 2 else _quantize_q8_0(blocks)
    return out.reshape(n, -1).contiguous()


def dequantize_gguf(data: torch.Tensor, qtype, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] of GGUF blocks ``data`` (uint8 [N, row_bytes]); exactly llama.cpp's
    dequantized values in float32."""
    return torch.ops.metalcore.gguf_dequantize(data, gguf_qtype(qtype), dtype)


def gguf_linear(input: torch.Tensor, data: torch.Tensor, qtype, bias=None) -> torch.Tensor:
    """``input @ W.T + bias`` with W given as GGUF blocks; input [..., K] of any float dtype,
    output [..., N] in input's dtype (float32 accumulation). Differentiable in input and bias."""
    return torch.ops.metalcore.gguf_linear(input, data, gguf_qtype(qtype), bias)


# --- Whole models --------------------------------------------------------------------------


@dataclass
class QuantizeHandle:
    """What :func:`quantize_model` (or :func:`load_gguf_linears`) replaced, and how to undo it.

    ``replaced`` lists the module names now quantized; ``skipped`` maps names to the reason
    they were left alone. :meth:`undo` puts the original ``nn.Linear`` modules back (kept, with
    their float weights, unless ``keep_originals=False``: then it rebuilds them from the
    dequantized weights, a lossy inverse)."""

    replaced: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    _records: list[tuple[torch.nn.Module, str, torch.nn.Module | None, torch.nn.Module]] = field(
        default_factory=list, repr=False
    )
    active: bool = True

    def _swap(self, parent, attr: str, original, new, keep: bool) -> None:
        self._records.append((parent, attr, original if keep else None, new))
        setattr(parent, attr, new)

    def undo(self) -> None:
        """Restores every replaced module, in reverse order. Idempotent."""
        for parent, attr, original, ours in reversed(self._records):
            if original is None:
                w = ours.dequantize()
                original = torch.nn.Linear(
                    ours.in_features, ours.out_features, ours.bias is not None, device=w.device
                ).to(w.dtype)
                with torch.no_grad():
                    original.weight.copy_(w)
                    if ours.bias is not None:
                        original.bias.copy_(ours.bias)
            setattr(parent, attr, original)
        self._records.clear()
        self.active = False


def _quantized_linear(linear: torch.nn.Linear, scheme: str, group_size: int):
    from .nn.quant import GGUFLinear, Int4Linear, Int8Linear

    if scheme == "int4":
        return Int4Linear.from_float(linear, group_size)
    if scheme == "int8":
        return Int8Linear.from_float(linear, group_size)
    return GGUFLinear.from_float(linear, scheme)


def quantize_model(
    model: torch.nn.Module,
    scheme: str = "int4",
    group_size: int = 64,
    skip: tuple[str, ...] = ("lm_head",),
    filter_fn=None,
    keep_originals: bool = True,
) -> QuantizeHandle:
    """Replaces ``model``'s ``nn.Linear`` layers in place with quantized ones, one layer at a
    time on the layer's device. ``scheme``: "int4" / "int8" (affine, ``group_size``) or "Q4_0" /
    "Q8_0" (GGUF blocks). Layers whose name ends with an entry of ``skip`` (the output head, as
    transformers skips it), layers ``filter_fn(name, module)`` rejects, and layers whose
    in_features the format cannot group are left alone (listed in the handle's ``skipped``).
    Returns a :class:`QuantizeHandle`; ``handle.undo()`` restores the float layers."""
    if scheme not in ("int4", "int8", "Q4_0", "Q8_0"):
        raise ValueError(
            f"metalcore.quantize_model: 'scheme' must be 'int4', 'int8', 'Q4_0' or 'Q8_0', "
            f"got {scheme!r}"
        )
    multiple = group_size if scheme in ("int4", "int8") else 32
    handle = QuantizeHandle()
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if type(mod) is torch.nn.Linear  # subclasses may carry their own semantics
    ]
    for name, mod in targets:
        if any(name == s or name.endswith("." + s) for s in skip):
            handle.skipped[name] = "skipped by name"
            continue
        if filter_fn is not None and not filter_fn(name, mod):
            handle.skipped[name] = "rejected by filter_fn"
            continue
        if mod.in_features % multiple != 0:
            handle.skipped[name] = f"in_features {mod.in_features} is not a multiple of {multiple}"
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        handle._swap(parent, attr, mod, _quantized_linear(mod, scheme, group_size), keep_originals)
        handle.replaced.append(name)
    return handle


def load_gguf_linears(model: torch.nn.Module, path, names: dict[str, str]) -> QuantizeHandle:
    """Replaces the ``nn.Linear`` modules named by the keys of ``names`` with
    :class:`~metalcore.nn.GGUFLinear` layers holding the quantized tensors (the values: tensor
    names in the ``.gguf`` file at ``path``, read with the ``gguf`` package), bytes unchanged.
    The mapping is explicit because converters rename (and for some models permute) tensors;
    each tensor's shape must match its layer. Linear biases are kept. Returns a handle whose
    ``undo`` restores the original layers."""
    from gguf import GGUFReader

    from .nn.quant import GGUFLinear

    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    handle = QuantizeHandle()
    for module_name, tensor_name in names.items():
        if tensor_name not in tensors:
            raise KeyError(f"metalcore.load_gguf_linears: no tensor {tensor_name!r} in {path}")
        mod = model.get_submodule(module_name)
        new = GGUFLinear.from_gguf(tensors[tensor_name], mod.bias)
        if (new.in_features, new.out_features) != (mod.in_features, mod.out_features):
            raise ValueError(
                f"metalcore.load_gguf_linears: {tensor_name!r} is [{new.out_features}, "
                f"{new.in_features}], but {module_name!r} is [{mod.out_features}, "
                f"{mod.in_features}]"
            )
        parent_name, _, attr = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        handle._swap(parent, attr, mod, new.to(mod.weight.device), True)
        handle.replaced.append(module_name)
    return handle
