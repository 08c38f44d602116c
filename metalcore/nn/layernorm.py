"""LayerNorm module: a drop-in for ``torch.nn.LayerNorm`` that runs the metalcore op."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as mf
from .._dispatch import kernel_applies


def layer_norm_kernel_applies(op: str, module: torch.nn.LayerNorm, x: Tensor, *others) -> bool:
    """Whether the op covers ``module`` on ``x``: the trailing dims are ``normalized_shape`` and
    input, weight and bias share a dtype and a device with a kernel. Anything else (a weight in
    another dtype, a device without a kernel, a shape torch would reject) runs torch's own code,
    so results and errors there stay torch's."""
    shape = tuple(module.normalized_shape)
    k = len(shape)
    return (
        k >= 1
        and x.dim() >= k
        and tuple(x.shape[x.dim() - k :]) == shape
        and kernel_applies(op, x, *others, module.weight, module.bias)
    )


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` whose forward is the fused ``metalcore::layer_norm`` op.

    Same constructor (``normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device,
    dtype``), parameters, ``state_dict`` keys and ``isinstance`` relation as
    ``torch.nn.LayerNorm``; a ``state_dict`` of either loads into the other. Any
    ``normalized_shape`` is covered (several trailing dims are normalised as one row). Inputs the
    op does not cover (mixed dtypes, devices without a kernel, complex) run
    ``torch.nn.LayerNorm.forward`` unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and layer_norm_kernel_applies("layer_norm", self, x):
            return mf.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return super().forward(x)


class FusedAddLayerNorm(LayerNorm):
    """Residual add followed by LayerNorm in one op (pre-norm GPT-2 style blocks).

    ``forward(x, residual)`` returns ``(layer_norm(x + residual), x + residual)``: the
    normalised sum and the new residual stream. Nothing is modified in place. Constructor,
    parameters and ``state_dict`` are those of ``torch.nn.LayerNorm`` (it is one).
    """

    def forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if (
            isinstance(x, Tensor)
            and isinstance(residual, Tensor)
            and x.shape == residual.shape
            and layer_norm_kernel_applies("fused_add_layer_norm", self, x, residual)
        ):
            return mf.fused_add_layer_norm(
                x, residual, self.normalized_shape, self.weight, self.bias, self.eps
            )
        h = x + residual
        return torch.nn.LayerNorm.forward(self, h), h
