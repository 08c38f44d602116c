"""A small Llama-style causal language model built from the metalcore modules.

It serves the export demo, the ``python -m metalcore`` training comparison and the
distributed tests. ``kernels=False`` builds the same model (same parameter names, same
initialisation from the same seed) from plain torch modules and math, which is the reference
the metalcore version is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .mlp import SwiGLUMLP, swiglu
from .rmsnorm import FusedAddRMSNorm, RMSNorm
from .rotary import RotaryEmbedding, apply_rotary, apply_rotary_torch


@dataclass
class TinyLlamaConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 512

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class _Attention(torch.nn.Module):
    def __init__(self, cfg: TinyLlamaConfig, kernels: bool) -> None:
        super().__init__()
        self.kernels = kernels
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        h = cfg.hidden_size
        self.q_proj = torch.nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = torch.nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = torch.nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = torch.nn.Linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = (apply_rotary if self.kernels else apply_rotary_torch)(q, k, cos, sin)
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class _Block(torch.nn.Module):
    def __init__(self, cfg: TinyLlamaConfig, kernels: bool) -> None:
        super().__init__()
        self.kernels = kernels
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = _Attention(cfg, kernels)
        self.mlp = SwiGLUMLP(h, cfg.intermediate_size)
        self.input_layernorm = (RMSNorm if kernels else torch.nn.RMSNorm)(h, eps)
        self.post_attention_layernorm = (FusedAddRMSNorm if kernels else torch.nn.RMSNorm)(h, eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin)
        if self.kernels:
            normed, residual = self.post_attention_layernorm(attn, x)
            up = swiglu(self.mlp.gate_proj(normed), self.mlp.up_proj(normed))
        else:
            residual = x + attn
            normed = self.post_attention_layernorm(residual)
            up = F.silu(self.mlp.gate_proj(normed)) * self.mlp.up_proj(normed)
        return residual + self.mlp.down_proj(up)


class TinyLlama(torch.nn.Module):
    """Llama-architecture causal LM (RMSNorm, rotary, GQA attention, SwiGLU MLP).

    ``forward(input_ids [B, S]) -> logits [B, S, vocab]``. Parameter names follow transformers'
    ``LlamaForCausalLM`` without the ``model.`` prefix. ``kernels=True`` uses metalcore's
    ``RMSNorm``, ``FusedAddRMSNorm``, ``rope`` and ``swiglu``; ``kernels=False`` uses
    ``torch.nn.RMSNorm`` and torch math (the reference).
    """

    def __init__(self, cfg: TinyLlamaConfig | None = None, kernels: bool = True) -> None:
        super().__init__()
        cfg = cfg or TinyLlamaConfig()
        self.config, self.kernels = cfg, kernels
        self.embed_tokens = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = torch.nn.ModuleList(
            _Block(cfg, kernels) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = (RMSNorm if kernels else torch.nn.RMSNorm)(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        cos, sin = self.rotary_emb(x, positions)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))
