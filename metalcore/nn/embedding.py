"""EmbeddingBag module: a drop-in for ``torch.nn.EmbeddingBag`` that runs the metalcore op."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as mf
from .._dispatch import kernel_applies

_INDEX_DTYPES = (torch.int32, torch.int64)


class EmbeddingBag(torch.nn.EmbeddingBag):
    """``torch.nn.EmbeddingBag`` whose forward is the ``metalcore::embedding_bag`` op (and its
    backward the deterministic ``metalcore::embedding_bag_backward``: each weight row's gradient
    summed in index order, no atomics).

    Same constructor, parameters, ``state_dict`` keys and ``isinstance`` relation as
    ``torch.nn.EmbeddingBag``; a ``state_dict`` of either loads into the other, and
    :meth:`from_torch` wraps an existing module's weight. What the op does not cover runs
    ``torch.nn.EmbeddingBag.forward`` unchanged, with torch's results and errors: ``max_norm``
    (which renormalises rows in place), ``scale_grad_by_freq``, ``sparse=True`` gradients,
    indices and offsets of different integer dtypes, and devices without a kernel.
    """

    @classmethod
    def from_torch(cls, module: torch.nn.EmbeddingBag) -> EmbeddingBag:
        """A metalcore EmbeddingBag sharing ``module``'s weight (no copy) and settings."""
        new = cls(
            module.num_embeddings,
            module.embedding_dim,
            max_norm=module.max_norm,
            norm_type=module.norm_type,
            scale_grad_by_freq=module.scale_grad_by_freq,
            mode=module.mode,
            sparse=module.sparse,
            _weight=module.weight.detach(),
            include_last_offset=module.include_last_offset,
            padding_idx=module.padding_idx,
        )
        new.weight = module.weight  # the same Parameter: an optimizer holding it keeps working
        return new

    def _op_applies(self, input: Tensor, offsets: Tensor | None, psw: Tensor | None) -> bool:
        if self.max_norm is not None or self.scale_grad_by_freq or self.sparse:
            return False
        if self.mode not in ("sum", "mean", "max") or not isinstance(input, Tensor):
            return False
        if input.dtype not in _INDEX_DTYPES or input.device != self.weight.device:
            return False
        if offsets is not None and (
            not isinstance(offsets, Tensor)
            or offsets.dtype != input.dtype
            or offsets.device != input.device
        ):
            return False
        return input.dim() in (1, 2) and kernel_applies("embedding_bag", self.weight, psw)

    def forward(
        self,
        input: Tensor,
        offsets: Tensor | None = None,
        per_sample_weights: Tensor | None = None,
    ) -> Tensor:
        if self._op_applies(input, offsets, per_sample_weights):
            return mf.embedding_bag(
                input,
                self.weight,
                offsets,
                self.mode,
                per_sample_weights,
                self.include_last_offset,
                self.padding_idx,
            )
        return super().forward(input, offsets, per_sample_weights)
