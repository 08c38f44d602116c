"""Quantized linear layers: ``Int4Linear``, ``Int8Linear`` (affine, MLX layout) and
``GGUFLinear`` (a GGUF tensor's blocks as they are in the file).

Every stored tensor is a persistent buffer in the device-independent layout of
:mod:`metalcore.quant`, so ``state_dict`` files load on any device and ``.to(device)`` is a
byte copy. The quantized weight is frozen (integer codes, and frozen scales); the input and the
optional ``bias`` get gradients, so adapters (LoRA) can be trained on top.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import quant as q

__all__ = ["GGUFLinear", "Int4Linear", "Int8Linear"]


def _bias_for(bias: Tensor | None, x: Tensor) -> Tensor | None:
    # The ops take a bias of the input's dtype (as F.linear does for matching dtypes).
    return None if bias is None else bias.to(x.dtype)


class _AffineLinear(torch.nn.Module):
    bits = 4

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 64,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
    ):
        super().__init__()
        name = type(self).__name__
        if group_size not in q.GROUP_SIZES:
            raise ValueError(f"{name}: 'group_size' must be 32, 64 or 128, got {group_size}")
        if in_features % group_size != 0:
            raise ValueError(
                f"{name}: in_features ({in_features}) must be a multiple of group_size "
                f"({group_size})"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        width = in_features // 2 if self.bits == 4 else in_features
        groups = in_features // group_size
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros(out_features, width, dtype=torch.uint8, **kw))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=dtype, **kw))
        self.register_buffer("biases", torch.zeros(out_features, groups, dtype=dtype, **kw))
        if bias:
            # Frozen like the weight by default; set requires_grad to train it.
            self.bias = torch.nn.Parameter(
                torch.zeros(out_features, dtype=dtype, **kw), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_float(
        cls, linear: torch.nn.Linear, group_size: int = 64, dtype: torch.dtype | None = None
    ):
        """Quantizes ``linear``'s weight (on its device); scales and biases in ``dtype``
        (default: the weight's dtype, float32 for float64)."""
        w = linear.weight.detach()
        quantize = q.quantize_int4 if cls.bits == 4 else q.quantize_int8
        qweight, scales, biases = quantize(w, group_size, dtype)
        mod = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            group_size,
            scales.dtype,
            w.device,
        )
        mod.qweight.copy_(qweight)
        mod.scales.copy_(scales)
        mod.biases.copy_(biases)
        if linear.bias is not None:
            mod.bias.data = linear.bias.detach().clone()
        return mod

    from_linear = from_float

    def dequantize(self) -> Tensor:
        """The float weight [out_features, in_features] (lossy inverse of quantizing)."""
        op = q.dequantize_int4 if self.bits == 4 else q.dequantize_int8
        return op(self.qweight, self.scales, self.biases, self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        op = q.int4_linear if self.bits == 4 else q.int8_linear
        return op(
            x, self.qweight, self.scales, self.biases, self.group_size, _bias_for(self.bias, x)
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}, "
            f"scales_dtype={self.scales.dtype}"
        )


class Int4Linear(_AffineLinear):
    """``nn.Linear`` with an affine 4-bit weight: ``qweight`` uint8 [out, in/2] (low nibble =
    even input index), ``scales`` and ``biases`` [out, in/group_size]. Build one with
    :meth:`from_float` (MLX's quantizer, byte-compatible with ``mx.quantize(w, g, 4)``)."""

    bits = 4


class Int8Linear(_AffineLinear):
    """``nn.Linear`` with an affine 8-bit weight: ``qweight`` uint8 [out, in]."""

    bits = 8


class GGUFLinear(torch.nn.Module):
    """``nn.Linear`` whose weight is GGUF blocks (Q4_0, Q8_0, Q4_K or Q6_K): ``data`` uint8
    [out_features, row_bytes], the bytes of a ``.gguf`` tensor unchanged. Build one with
    :meth:`from_gguf` (a tensor of ``gguf.GGUFReader``) or :meth:`from_float` (Q4_0 / Q8_0,
    byte-identical to llama.cpp's quantizer)."""

    def __init__(self, in_features: int, out_features: int, qtype, bias: bool = False, device=None):
        super().__init__()
        self.qtype = q.gguf_qtype(qtype)
        by_id = {v[0]: (name, v[1], v[2]) for name, v in q.GGUF_TYPES.items()}
        if self.qtype not in by_id:
            raise ValueError(f"GGUFLinear: unsupported ggml type {qtype!r}")
        self.type_name, block, nbytes = by_id[self.qtype]
        if in_features % block != 0:
            raise ValueError(
                f"GGUFLinear: in_features ({in_features}) must be a multiple of the "
                f"{self.type_name} block size ({block})"
            )
        self.in_features, self.out_features = in_features, out_features
        row = in_features // block * nbytes
        self.register_buffer(
            "data", torch.zeros(out_features, row, dtype=torch.uint8, device=device)
        )
        if bias:
            self.bias = torch.nn.Parameter(
                torch.zeros(out_features, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, qtype="Q4_0"):
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, qtype, linear.bias is not None, w.device)
        mod.data.copy_(q.quantize_gguf(w, qtype))
        if linear.bias is not None:
            mod.bias.data = linear.bias.detach().clone()
        return mod

    @classmethod
    def from_gguf(cls, tensor, bias: Tensor | None = None):
        """From a ``gguf.GGUFReader`` tensor (``.data``, ``.shape`` in ggml order: in_features
        first, ``.tensor_type``) holding a 2-D quantized weight."""
        import numpy as np

        shape = [int(s) for s in tensor.shape]
        if len(shape) != 2:
            raise ValueError(f"GGUFLinear.from_gguf: expected a 2-D tensor, got shape {shape}")
        k, n = shape
        mod = cls(k, n, int(tensor.tensor_type), bias is not None)
        raw = torch.from_numpy(np.ascontiguousarray(tensor.data).view(np.uint8).copy())
        mod.data.copy_(raw.reshape(n, -1))
        if bias is not None:
            mod.bias.data = bias.detach().clone()
        return mod

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return q.dequantize_gguf(self.data, self.qtype, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return q.gguf_linear(x, self.data, self.qtype, _bias_for(self.bias, x))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"qtype={self.type_name}, bias={self.bias is not None}"
        )
