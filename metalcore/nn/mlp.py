"""SwiGLU MLP with the parameter names of Hugging Face's ``LlamaMLP``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import functional as mf
from .._dispatch import kernel_applies


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``: the metalcore op where it applies, torch's two ops elsewhere."""
    if gate.shape == up.shape and kernel_applies("swiglu", gate, up):
        return mf.swiglu(gate, up)
    return F.silu(gate) * up


class SwiGLUMLP(torch.nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, with the activation and product fused.

    The submodules are named ``gate_proj``, ``up_proj`` and ``down_proj`` as in transformers'
    ``LlamaMLP`` (and Mistral's, Qwen2's, Qwen3's), so their ``state_dict``s load into each other.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
