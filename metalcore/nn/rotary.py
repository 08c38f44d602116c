"""Rotary position embedding compatible with Hugging Face's ``LlamaRotaryEmbedding``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import functional as mf
from .._dispatch import kernel_applies

ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(
    dim: int,
    base: float = 10000.0,
    rope_scaling: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Inverse frequencies ``base**(-2i/dim)`` (float32, ``[dim // 2]``), after rope scaling.

    ``rope_scaling`` is a Hugging Face ``rope_scaling``/``rope_parameters`` mapping; its
    ``rope_type`` (or legacy ``type``) may be ``default``, ``linear`` (positions divided by
    ``factor``) or ``llama3`` (wavelengths longer than ``original_max_position_embeddings /
    low_freq_factor`` divided by ``factor``, shorter than ``.../high_freq_factor`` kept, a
    linear blend in between).
    """
    scaling = dict(rope_scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"metalcore.nn.RotaryEmbedding: rope_type {rope_type!r} is not supported "
            f"(supported: {', '.join(ROPE_TYPES)})"
        )
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (base**exponents)
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are stretched by `factor`, short ones kept, and
        # the band between is blended linearly in old_len / wavelen.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def apply_rotary_torch(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Half-split ("rotate_half") rotary embedding in plain torch ops, same layouts as
    ``metalcore.rope``; ``rot = cos.shape[-1] < head_dim`` rotates only the first ``rot``
    features."""
    if cos.dim() == 3:  # [B, S, R] broadcasts over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]

    def one(x: Tensor) -> Tensor:
        xr, xp = x[..., :rot], x[..., rot:]
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
        out = xr * cos + torch.cat((-x2, x1), dim=-1) * sin
        return torch.cat((out, xp), dim=-1) if rot < x.shape[-1] else out

    return one(q), one(k)


def rope_kernel_applies(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether ``metalcore.rope`` covers these inputs (layout, dtypes, device kernel)."""
    # cos/sin may be float32 with 16-bit q/k (exact angles for long contexts).
    reduced = q.dtype in (torch.float16, torch.bfloat16)
    return (
        q.dim() == 4
        and k.dim() == 4
        and cos.dim() in (2, 3)
        and sin.shape == cos.shape
        and k.dtype == q.dtype
        and sin.dtype == cos.dtype
        and (cos.dtype == q.dtype or (reduced and cos.dtype == torch.float32))
        and not cos.requires_grad
        and not sin.requires_grad
        and kernel_applies("rope", q, k, cos, sin, same_dtype=False)
    )


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding of ``q`` ``[B, Hq, S, D]`` and ``k`` ``[B, Hk, S, D]`` with the
    ``(cos, sin)`` of :class:`RotaryEmbedding` (or Hugging Face's): the ``metalcore.rope`` op
    where it applies, :func:`apply_rotary_torch` elsewhere."""
    if rope_kernel_applies(q, k, cos, sin):
        return mf.rope(q, k, cos, sin)
    return apply_rotary_torch(q, k, cos, sin)


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embedding tables, numerically identical to transformers'
    ``LlamaRotaryEmbedding`` for the ``default``, ``linear`` and ``llama3`` rope types.

    ``forward(x, position_ids)`` returns ``(cos, sin)``, each ``[batch, seq, dim]`` in
    ``x.dtype``, exactly as Hugging Face's module does; :meth:`apply` (or
    :func:`apply_rotary`) rotates ``q``/``k`` with them through ``metalcore.rope``. The
    inverse frequencies are a non-persistent buffer (as in transformers), so the module adds
    nothing to a ``state_dict``.

    Args:
        dim: rotated features per head (``head_dim``, or ``head_dim * partial_rotary_factor``).
        max_position_embeddings: informational, kept for parity with transformers.
        base: ``rope_theta``.
        rope_scaling: Hugging Face rope scaling mapping (see :func:`rope_inv_freq`).
    """

    def __init__(
        self,
        dim: int,
        max_position_embeddings: int = 2048,
        base: float = 10000.0,
        rope_scaling: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"metalcore.nn.RotaryEmbedding: dim must be even and > 0, got {dim}")
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = float(base)
        self.rope_scaling = dict(rope_scaling) if rope_scaling else None
        scaling = self.rope_scaling or {}
        self.rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        # transformers' attention_scaling is 1.0 for these three rope types.
        self.attention_scaling = 1.0
        inv_freq = rope_inv_freq(dim, self.base, self.rope_scaling, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @classmethod
    def from_config(cls, config: Any, device: torch.device | str | None = None) -> RotaryEmbedding:
        """Builds the module from a transformers model config (v4 ``rope_theta``/``rope_scaling``
        or v5 ``rope_parameters``; ``head_dim`` and ``partial_rotary_factor`` honoured)."""
        params = getattr(config, "rope_parameters", None)
        if params:
            params = dict(params)
            base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        else:
            params = dict(getattr(config, "rope_scaling", None) or {})
            base = getattr(config, "rope_theta", 10000.0)
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        return cls(
            int(head_dim * factor),
            getattr(config, "max_position_embeddings", 2048),
            base,
            params,
            device,
        )

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        # float32 tables whatever the model dtype (as transformers: autocast must not lower
        # the precision of position * frequency), rounded to x.dtype at the end.
        # (autocast has no "mps" or "meta" device type; those tables are computed as on CPU.)
        device_type = x.device.type if x.device.type in ("cpu", "cuda", "xpu") else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float32)
            freqs = position_ids[..., None].float() * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)

    @staticmethod
    def apply(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Rotates ``q``/``k`` (``[B, H, S, D]``) with this module's ``(cos, sin)``."""
        return apply_rotary(q, k, cos, sin)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, rope_type={self.rope_type}"
