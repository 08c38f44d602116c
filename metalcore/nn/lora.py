"""LoRA linear layer: a base ``torch.nn.Linear`` plus a rank-r update, as one metalcore op."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import functional as mf
from .._dispatch import kernel_applies


class LoRALinear(torch.nn.Module):
    """``base(x) + scaling * lora_B(lora_A(dropout(x)))`` with PEFT's layout and defaults.

    ``base`` is a ``torch.nn.Linear`` (kept as ``base_layer``, its weight frozen unless
    ``freeze_base=False``); ``lora_A`` is ``Linear(in, r, bias=False)`` (Kaiming-uniform, as
    PEFT) and ``lora_B`` ``Linear(r, out, bias=False)`` (zeros, so a new adapter starts as the
    base layer); ``scaling = alpha / r`` (PEFT's ``lora_alpha / r``). The forward is
    ``metalcore.lora_linear``: one op whose low-rank path never forms ``lora_B @ lora_A``, and
    whose backward skips the base weight's gradient while the base is frozen. Inputs the op does
    not cover (mixed dtypes, a device without a kernel) and dropout in training mode (the branch
    then sees another input than the base) run the same math in plain torch.

    :meth:`from_peft` takes a PEFT ``lora.Linear`` layer (its ``base_layer``, ``lora_A``,
    ``lora_B``, ``scaling`` and ``lora_dropout`` of one adapter) and shares its parameters.
    """

    def __init__(
        self,
        base: torch.nn.Linear,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        freeze_base: bool = True,
    ):
        super().__init__()
        if not isinstance(base, torch.nn.Linear):
            raise TypeError(
                f"metalcore.nn.LoRALinear: 'base' must be a torch.nn.Linear, got {type(base)}"
            )
        if r < 1:
            raise ValueError(f"metalcore.nn.LoRALinear: 'r' must be >= 1, got {r}")
        self.base_layer = base
        w = base.weight
        self.lora_A = torch.nn.Linear(
            base.in_features, r, bias=False, device=w.device, dtype=w.dtype
        )
        self.lora_B = torch.nn.Linear(
            r, base.out_features, bias=False, device=w.device, dtype=w.dtype
        )
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_B.weight)
        self.scaling = float(alpha) / r
        self.lora_dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        if freeze_base:
            base.weight.requires_grad_(False)
            if base.bias is not None:
                base.bias.requires_grad_(False)

    @classmethod
    def from_peft(cls, layer, adapter: str | None = None) -> LoRALinear:
        """Wraps a PEFT ``lora.Linear`` (or any module with its attributes): the same
        parameter tensors (not copies), scaling and dropout of ``adapter`` (PEFT's active
        adapter when None)."""
        base = getattr(layer, "base_layer", None)
        if not isinstance(base, torch.nn.Linear):
            raise TypeError(
                "metalcore.nn.LoRALinear.from_peft: the layer must have a torch.nn.Linear "
                f"'base_layer' (a PEFT lora.Linear), got {type(base)}"
            )
        if adapter is None:
            active = getattr(layer, "active_adapters", None) or getattr(
                layer, "active_adapter", "default"
            )
            adapter = active[0] if isinstance(active, (list, tuple)) else active
        try:
            lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
            scaling = layer.scaling[adapter]
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f"metalcore.nn.LoRALinear.from_peft: the layer has no adapter {adapter!r} "
                "(lora_A, lora_B and scaling are looked up by adapter name)"
            ) from e
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module.base_layer = base
        module.lora_A = lora_a
        module.lora_B = lora_b
        module.scaling = float(scaling)
        dropouts = getattr(layer, "lora_dropout", None)
        module.lora_dropout = (
            dropouts[adapter]
            if dropouts is not None and adapter in dropouts
            else torch.nn.Identity()
        )
        return module

    def _dropout_active(self) -> bool:
        d = self.lora_dropout
        return self.training and isinstance(d, torch.nn.Dropout) and d.p > 0

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.base_layer.weight, self.base_layer.bias
        a, bm = self.lora_A.weight, self.lora_B.weight
        if (
            isinstance(x, Tensor)
            and not self._dropout_active()
            and x.dim() >= 1
            and kernel_applies("lora_linear", x, w, a, bm, b)
        ):
            return mf.lora_linear(x, w, a, bm, self.scaling, b)
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return (
            f"in_features={self.base_layer.in_features}, "
            f"out_features={self.base_layer.out_features}, r={self.lora_A.weight.shape[0]}, "
            f"scaling={self.scaling}"
        )
