"""Typed Python wrappers of the metalcore ops.

Each function calls one ``torch.ops.metalcore`` operator, so it works in eager mode, under
``torch.compile(fullgraph=True)`` and in ``torch.export`` graphs, on every device with a kernel
(CPU always; MPS and CUDA where built). Gradients flow through the ops' own backward ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_ops = torch.ops.metalcore


def rmsnorm(input: Tensor, weight: Tensor | None = None, eps: float | None = None) -> Tensor:
    """Root-mean-square normalisation over the last dimension.

    ``y = input / sqrt(mean(input**2, -1) + eps) * weight``, accumulated in float32 (float64
    for float64 input). Same semantics as ``torch.nn.functional.rms_norm(input, (N,), weight,
    eps)``; ``eps=None`` means ``torch.finfo(input.dtype).eps`` as there.

    Args:
        input: ``[..., N]`` float16, bfloat16, float32 or float64; any strides.
        weight: optional ``[N]`` of the same dtype.
    """
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    return _ops.rmsnorm(input, weight, eps)


def fused_add_rmsnorm(
    input: Tensor, residual: Tensor, weight: Tensor | None = None, eps: float | None = None
) -> tuple[Tensor, Tensor]:
    """Residual add followed by RMSNorm, in one pass (pre-norm transformer blocks).

    Returns ``(rmsnorm(input + residual, weight, eps), input + residual)``; the sum is rounded
    to the input dtype before it is normalised, exactly as the unfused code would. Nothing is
    modified in place.
    """
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    return _ops.fused_add_rmsnorm(input, residual, weight, eps)


def silu(input: Tensor) -> Tensor:
    """``input * sigmoid(input)``, elementwise, as ``torch.nn.functional.silu``."""
    return _ops.silu(input)


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """GELU, exact (``'none'``, erf) or ``'tanh'``-approximated, as ``torch.nn.functional.gelu``."""
    return _ops.gelu(input, approximate)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` in one pass (the activation of Llama-style MLPs)."""
    return _ops.swiglu(gate, up)


def rope(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False
) -> tuple[Tensor, Tensor]:
    """Rotary position embedding of ``q`` and ``k`` in one op (Hugging Face layout).

    Args:
        q: ``[batch, q_heads, seq, head_dim]``.
        k: ``[batch, kv_heads, seq, head_dim]`` (``kv_heads`` may differ from ``q_heads``: GQA).
        cos, sin: ``[seq, rot]`` or ``[batch or 1, seq, rot]`` as produced by Hugging Face rotary
            embeddings (``rot <= head_dim``, even; ``rot < head_dim`` rotates only the first
            ``rot`` features and passes the rest through).
        interleaved: ``False`` pairs feature ``i`` with ``i + rot/2`` (Llama/HF "rotate_half");
            ``True`` pairs ``2i`` with ``2i+1`` (GPT-J).

    Returns ``(q_rotated, k_rotated)``, contiguous, in q's dtype. Gradients flow to ``q`` and
    ``k``; ``cos``/``sin`` must not require grad (an error, not a silently dropped gradient).

    dtypes: q and k float16, bfloat16, float32 or float64 (the same); cos/sin the same dtype, or
    float32 with float16/bfloat16 q/k (exact angles for long contexts). Math is float32 (float64
    for float64), rounded once, so 16-bit results can differ from Hugging Face's by an ulp
    (HF rounds after each multiply and the add). q/k may be any strided views with a unit stride
    on ``head_dim`` (e.g. ``[batch, seq, heads, head_dim].transpose(1, 2)``) without a copy.
    """
    return _ops.rope(q, k, cos, sin, interleaved)


def adamw_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    weight_decay: float = 1e-2,
    eps: float = 1e-8,
    amsgrad: bool = False,
    max_exp_avg_sqs: Sequence[Tensor] = (),
    maximize: bool = False,
) -> None:
    """One fused AdamW step over lists of tensors, in place (same math as ``torch.optim.AdamW``).

    Increments every ``state_steps[i]`` (float32 0-dim tensors) and uses the new value for the
    bias corrections. ``lr`` may be a 0-dim tensor (no recompiles under ``torch.compile`` when a
    scheduler changes it). Params may be float32, bfloat16 or float16; states are float32 or the
    param dtype. ``metalcore.optim.AdamW`` wraps this as a drop-in optimizer.
    """
    if not isinstance(lr, Tensor):
        lr = torch.tensor(float(lr), dtype=torch.float64)
    _ops.adamw(
        list(params),
        list(grads),
        list(exp_avgs),
        list(exp_avg_sqs),
        list(max_exp_avg_sqs),
        list(state_steps),
        lr,
        beta1,
        beta2,
        weight_decay,
        eps,
        amsgrad,
        maximize,
    )
