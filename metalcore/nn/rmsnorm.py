"""RMSNorm modules: drop-ins for ``torch.nn.RMSNorm`` that run the metalcore ops."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as mf
from .._dispatch import kernel_applies


def default_eps(dtype: torch.dtype) -> float:
    """``torch.nn.RMSNorm``'s ``eps=None``: the machine epsilon of the type torch computes in,
    float32 for float16/bfloat16/float32 inputs and float64 for float64 (not the input dtype's
    own: bfloat16's 2**-7 would swamp the mean square of a row of 0.01s)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _check_floating(where: str, name: str, t: Tensor) -> None:
    # torch's own rms_norm raises NotImplementedError from deep inside ATen for integer and bool
    # inputs; complex inputs are torch's business (they take its code, as in torch).
    if not (t.is_floating_point() or t.is_complex()):
        raise TypeError(f"{where}: '{name}' must be a floating point tensor, got {t.dtype}")


def _kernel_applies(op: str, module: torch.nn.RMSNorm, x: Tensor, *others: Tensor) -> bool:
    # The op normalises over the last dim with a weight of x's dtype. Anything else (a
    # multi-dim normalized_shape, a weight in another dtype, a device without a kernel, a
    # shape torch would reject) runs torch's own code, so results and errors stay torch's.
    shape = module.normalized_shape
    return (
        len(shape) == 1
        and x.dim() >= 1
        and x.shape[-1] == shape[0]
        and kernel_applies(op, x, *others, module.weight)
    )


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` whose forward is the fused ``metalcore::rmsnorm`` op.

    Same constructor (``normalized_shape, eps=None, elementwise_affine=True, device, dtype``),
    parameters, ``state_dict`` keys and ``isinstance`` relation as ``torch.nn.RMSNorm``; a
    ``state_dict`` of either loads into the other. ``eps=None`` means what it means in torch:
    the epsilon of float32 for float16, bfloat16 and float32 inputs, of float64 for float64.

    The op covers a 1-D ``normalized_shape`` (the last dim) with a weight of the input's dtype
    on devices with a metalcore kernel. Other cases (multi-dim ``normalized_shape``, mixed
    dtypes, other devices, complex inputs) run ``torch.nn.RMSNorm.forward`` unchanged. Integer
    and bool inputs raise ``TypeError``.
    """

    def forward(self, x: Tensor) -> Tensor:
        _check_floating("metalcore.nn.RMSNorm", "input", x)
        if _kernel_applies("rmsnorm", self, x):
            eps = default_eps(x.dtype) if self.eps is None else self.eps
            return mf.rmsnorm(x, self.weight, eps)
        return super().forward(x)


class FusedAddRMSNorm(RMSNorm):
    """Residual add followed by RMSNorm in one op, for pre-norm transformer blocks.

    ``forward(x, residual)`` returns ``(rmsnorm(x + residual), x + residual)``: the normalised
    sum and the new residual stream. Nothing is modified in place. Constructor, parameters,
    ``state_dict`` and ``eps=None`` are those of ``torch.nn.RMSNorm`` (it is one).
    """

    def forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        _check_floating("metalcore.nn.FusedAddRMSNorm", "input", x)
        _check_floating("metalcore.nn.FusedAddRMSNorm", "residual", residual)
        if x.shape == residual.shape and _kernel_applies("fused_add_rmsnorm", self, x, residual):
            eps = default_eps(x.dtype) if self.eps is None else self.eps
            return mf.fused_add_rmsnorm(x, residual, self.weight, eps)
        h = x + residual
        return torch.nn.RMSNorm.forward(self, h), h
