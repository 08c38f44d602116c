"""RMSNorm modules: drop-ins for ``torch.nn.RMSNorm`` that run the metalcore ops."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as mf
from .._dispatch import KERNEL_DTYPES, has_kernel


def _kernel_applies(
    op: str, module: torch.nn.RMSNorm, x: Tensor, weight: Tensor | None = None
) -> bool:
    # The op normalises over the last dim with a weight of x's dtype. Anything else (a
    # multi-dim normalized_shape, a weight in another dtype, a device without a kernel, a
    # shape torch would reject) runs torch's own code, so results and errors stay torch's.
    shape = module.normalized_shape
    return (
        len(shape) == 1
        and x.dim() >= 1
        and x.shape[-1] == shape[0]
        and x.dtype in KERNEL_DTYPES
        and (weight is None or weight.dtype == x.dtype)
        and has_kernel(op, x.device.type)
    )


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` whose forward is the fused ``metalcore::rmsnorm`` op.

    Same constructor (``normalized_shape, eps=None, elementwise_affine=True, device, dtype``),
    parameters, ``state_dict`` keys and ``isinstance`` relation as ``torch.nn.RMSNorm``; a
    ``state_dict`` of either loads into the other. ``eps=None`` means
    ``torch.finfo(input.dtype).eps``, as in torch.

    The op covers a 1-D ``normalized_shape`` (the last dim) with a weight of the input's dtype
    on devices with a metalcore kernel. Other cases (multi-dim ``normalized_shape``, mixed
    dtypes, other devices) run ``torch.nn.RMSNorm.forward`` unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        if _kernel_applies("rmsnorm", self, x, self.weight):
            return mf.rmsnorm(x, self.weight, self.eps)
        return super().forward(x)


class FusedAddRMSNorm(RMSNorm):
    """Residual add followed by RMSNorm in one op, for pre-norm transformer blocks.

    ``forward(x, residual)`` returns ``(rmsnorm(x + residual), x + residual)``: the normalised
    sum and the new residual stream. Nothing is modified in place. Constructor, parameters and
    ``state_dict`` are those of ``torch.nn.RMSNorm`` (it is one).
    """

    def forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if x.shape == residual.shape and x.dtype == residual.dtype:
            if _kernel_applies("fused_add_rmsnorm", self, x, self.weight):
                return mf.fused_add_rmsnorm(x, residual, self.weight, self.eps)
        h = x + residual
        return torch.nn.RMSNorm.forward(self, h), h
