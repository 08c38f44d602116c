"""Optimizers whose step is a fused metalcore op (drop-ins for ``torch.optim``)."""

from .adamw import AdamW

__all__ = ["AdamW"]
