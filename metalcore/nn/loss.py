"""Loss modules: the LM head and cross-entropy fused, over the metalcore ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import functional as mf
from .._dispatch import kernel_applies


class LinearCrossEntropyLoss(torch.nn.Module):
    """``CrossEntropyLoss(F.linear(input, weight, bias), target)`` without the logits.

    The module holds no parameters: the LM head keeps its weight (and bias), which are passed
    to ``forward(input, weight, target, bias=None)`` with ``input`` [..., H] hidden states,
    ``weight`` [V, H] and ``target`` [...] int64 class indices. The constructor takes
    ``torch.nn.CrossEntropyLoss``'s ``ignore_index``, ``reduction`` and ``label_smoothing``.

    Where ``metalcore::fused_linear_cross_entropy`` has a kernel for the tensors (one device,
    one float dtype for input, weight and bias, int64 targets) the loss is computed in chunks
    of tokens, so the [N, V] logits and their gradient never exist at once: at 8K tokens and a
    128K vocabulary those are 4 GiB each in float32. Anywhere else it runs torch's
    ``F.linear`` + ``F.cross_entropy`` unchanged.
    """

    def __init__(
        self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(
        self, input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None
    ) -> Tensor:
        if (
            input.dim() >= 2
            and weight.dim() == 2
            and target.dtype == torch.int64
            and target.shape == input.shape[:-1]
            and kernel_applies("fused_linear_cross_entropy", input, weight, bias)
            and target.device == input.device
        ):
            return mf.fused_linear_cross_entropy(
                input,
                weight,
                target,
                bias,
                ignore_index=self.ignore_index,
                reduction=self.reduction,
                label_smoothing=self.label_smoothing,
            )
        logits = F.linear(input, weight, bias)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
        return loss.reshape(target.shape) if self.reduction == "none" else loss

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}"
        )
