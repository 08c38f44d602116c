"""Typed Python wrappers of the metalcore ops.

Each function calls one ``torch.ops.metalcore`` operator, so it works in eager mode, under
``torch.compile(fullgraph=True)`` and in ``torch.export`` graphs, on every device with a kernel
(CPU always; MPS and CUDA where built). Gradients flow through the ops' own backward ops.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

_ops = torch.ops.metalcore

# torch.nn.functional.rms_norm's default eps is the machine epsilon of its op-math type
# (aten/src/ATen/native/layer_norm.cpp): float32's for float16, bfloat16 and float32 input,
# float64's for float64. Not finfo(input.dtype).eps: bfloat16's (7.8e-3) would swamp the mean
# square of small activations (a row of 0.01s would normalise to 0.11, not 1).
_EPS_FLOAT32 = torch.finfo(torch.float32).eps
_EPS_FLOAT64 = torch.finfo(torch.float64).eps


def _default_eps(input) -> float:
    # Any other dtype (or a non-tensor) gets float32's, so that the op itself rejects it with
    # its own error rather than torch.finfo raising first.
    return _EPS_FLOAT64 if getattr(input, "dtype", None) == torch.float64 else _EPS_FLOAT32


def rmsnorm(input: Tensor, weight: Tensor | None = None, eps: float | None = None) -> Tensor:
    """Root-mean-square normalisation over the last dimension.

    ``y = input / sqrt(mean(input**2, -1) + eps) * weight``, accumulated in float32 (float64
    for float64 input). Same semantics as ``torch.nn.functional.rms_norm(input, (N,), weight,
    eps)``; ``eps=None`` means the same default as there: the machine epsilon of float32
    (float64 for float64 input).

    Args:
        input: ``[..., N]`` float16, bfloat16, float32 or float64; any strides.
        weight: optional ``[N]`` of the same dtype.
    """
    if eps is None:
        eps = _default_eps(input)
    return _ops.rmsnorm(input, weight, eps)


def fused_add_rmsnorm(
    input: Tensor, residual: Tensor, weight: Tensor | None = None, eps: float | None = None
) -> tuple[Tensor, Tensor]:
    """Residual add followed by RMSNorm, in one pass (pre-norm transformer blocks).

    Returns ``(rmsnorm(input + residual, weight, eps), input + residual)``; the sum is rounded
    to the input dtype before it is normalised, exactly as the unfused code would. Nothing is
    modified in place. ``eps=None`` is :func:`rmsnorm`'s default.
    """
    if eps is None:
        eps = _default_eps(input)
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
    _ops.adamw(
        _tensor_list("params", params),
        _tensor_list("grads", grads),
        _tensor_list("exp_avgs", exp_avgs),
        _tensor_list("exp_avg_sqs", exp_avg_sqs),
        _tensor_list("max_exp_avg_sqs", max_exp_avg_sqs),
        _tensor_list("state_steps", state_steps),
        _lr_tensor(lr),
        beta1,
        beta2,
        weight_decay,
        eps,
        amsgrad,
        maximize,
    )


def _tensor_list(name: str, tensors) -> list:
    # A tensor is iterable (over its first dim): passing one where a list belongs would step
    # its rows as separate params. Say so instead.
    if not isinstance(tensors, Tensor):
        try:
            return list(tensors)
        except TypeError:
            pass
    raise TypeError(
        f"metalcore.adamw: '{name}' must be a list of tensors, got {type(tensors).__name__}"
    )


def _lr_tensor(lr) -> Tensor:
    if isinstance(lr, Tensor):
        return lr  # the op checks its shape, dtype, device and value
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real | torch.SymFloat | torch.SymInt):
        raise TypeError(
            "metalcore.adamw: 'lr' must be a float or a 0-dim float32/float64 tensor, "
            f"got {type(lr).__name__}"
        )
    return torch.tensor(float(lr), dtype=torch.float64)


# --- Weight-only quantization: the wrappers live in metalcore.quant (quantizers and formats
# belong with them); re-exported so every op has its wrapper here.
from .quant import (  # noqa: E402, F401
    dequantize_gguf,
    dequantize_int4,
    dequantize_int8,
    gguf_linear,
    int4_linear,
    int8_linear,
)

# --- LayerNorm -----------------------------------------------------------------------------------


def _normalized_dims(op: str, input, normalized_shape, weight, bias) -> int:
    """Checks ``normalized_shape`` against input, weight and bias as torch.nn.functional.layer_norm
    does, and returns how many trailing dims it covers."""
    if isinstance(normalized_shape, (int, torch.SymInt)) and not isinstance(normalized_shape, bool):
        shape = (normalized_shape,)
    elif isinstance(normalized_shape, (Sequence, torch.Size)) and all(
        isinstance(s, (int, torch.SymInt)) and not isinstance(s, bool) for s in normalized_shape
    ):
        shape = tuple(normalized_shape)
    else:
        raise TypeError(
            f"metalcore.{op}: 'normalized_shape' must be an int or a sequence of ints, got "
            f"{normalized_shape!r}"
        )
    k = len(shape)
    if k == 0:
        raise ValueError(f"metalcore.{op}: 'normalized_shape' must have at least one dim, got ()")
    if not isinstance(input, Tensor):
        return k  # the op names the argument in its own error
    if input.dim() < k or tuple(input.shape[input.dim() - k :]) != shape:
        raise ValueError(
            f"metalcore.{op}: 'normalized_shape' {list(shape)} must equal the last {k} dim(s) of "
            f"'input', got input of shape {list(input.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if isinstance(t, Tensor) and tuple(t.shape) != shape:
            raise ValueError(
                f"metalcore.{op}: '{name}' must have shape {list(shape)} (normalized_shape), got "
                f"{list(t.shape)}"
            )
    return k


def _flat_affine(t, k: int):
    return t.reshape(-1) if isinstance(t, Tensor) and k > 1 else t


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalisation over the trailing ``normalized_shape`` dims, as
    ``torch.nn.functional.layer_norm``.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the biased variance, computed in
    float32 (float64 for float64 input) in two passes over each row (never
    ``E[x^2] - E[x]^2``, which loses the variance of rows whose mean is large against their
    spread). A multi-dim ``normalized_shape`` is normalised as one flattened row.

    Args:
        input: ``[*, *normalized_shape]`` float16, bfloat16, float32 or float64; any strides.
        normalized_shape: an int or the trailing sizes of ``input``.
        weight, bias: optional, of shape ``normalized_shape`` and input's dtype.
    """
    k = _normalized_dims("layer_norm", input, normalized_shape, weight, bias)
    if k == 1:
        return _ops.layer_norm(input, weight, bias, eps)
    out = _ops.layer_norm(
        input.flatten(input.dim() - k), _flat_affine(weight, k), _flat_affine(bias, k), eps
    )
    return out.view(input.shape)


def fused_add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Residual add followed by LayerNorm in one pass (pre-norm GPT-2 style blocks).

    Returns ``(layer_norm(input + residual, normalized_shape, weight, bias, eps),
    input + residual)``; the sum is rounded to the input dtype before it is normalised, exactly
    as the unfused code would. Nothing is modified in place.
    """
    k = _normalized_dims("fused_add_layer_norm", input, normalized_shape, weight, bias)
    if k == 1:
        return _ops.fused_add_layer_norm(input, residual, weight, bias, eps)
    flat = input.dim() - k
    res = (
        residual.flatten(flat) if isinstance(residual, Tensor) and residual.dim() >= k else residual
    )
    out, h = _ops.fused_add_layer_norm(
        input.flatten(flat), res, _flat_affine(weight, k), _flat_affine(bias, k), eps
    )
    return out.view(input.shape), h.view(input.shape)


# --- Attention ---------------------------------------------------------------------------------


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
) -> tuple[Tensor, Tensor]:
    """Flash attention: ``(softmax(q k^T * scale + mask) v, lse)`` without an Lq x Lk buffer.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; v: ``[B, Hkv, Lk, Dv]``, one float dtype;
            any strides (a unit stride on the last dim avoids a copy). ``Hq % Hkv == 0``: query
            head ``h`` reads KV head ``h // (Hq // Hkv)`` (GQA/MQA, K/V never repeated).
        attn_mask: bool (True = keep) or additive in q's dtype, broadcastable to
            ``[B, Hq, Lq, Lk]``.
        scale: ``1/sqrt(D)`` when None.
        is_causal: F.scaled_dot_product_attention's top-left diagonal (key ``j <= i``).
        window_left, window_right: flash-attn's bottom-right sliding window, key ``j`` visible
            to query ``i`` iff ``i + Lk - Lq - left <= j <= i + Lk - Lq + right`` (-1:
            unbounded); ``(-1, 0)`` is bottom-right causal (decode over a KV cache).

    Returns ``out [B, Hq, Lq, Dv]`` in q's dtype and ``lse [B, Hq, Lq]``, the natural-log
    logsumexp of each row's scaled scores in float32 (float64 for float64 inputs); a row that
    sees no key gets ``out = 0`` and ``lse = +inf``. Both are differentiable.
    """
    return _ops.attention(q, k, v, attn_mask, scale, is_causal, window_left, window_right)


_SDPA = "scaled_dot_product_attention"
_sdpa_warned: set[str] = set()


def _sdpa_fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
    """Why the metalcore op cannot serve this F.scaled_dot_product_attention call, or None."""
    from ._dispatch import has_kernel

    if dropout_p > 0.0:
        return "dropout_p > 0 (the metalcore op has no dropout)"
    if not has_kernel("attention", query.device.type):
        return f"no metalcore attention kernel for {query.device.type} tensors in this build"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "inputs that are not 4-D [batch, heads, seq, head_dim]"
    if key.shape[0] != query.shape[0] or value.shape[0] != query.shape[0]:
        return "a batch broadcast between query and key/value"
    if query.device.type == "mps" and max(query.shape[-1], value.shape[-1]) > 256:
        return "head dims above 256 on MPS (the Metal kernels keep a row in threadgroup memory)"
    hq, hkv = query.shape[1], key.shape[1]
    if hq != hkv and (not enable_gqa or hkv == 0 or hq % hkv != 0):
        return "query heads that are not a multiple of the key/value heads (enable_gqa)"
    if attn_mask is not None:
        if is_causal:
            return "is_causal together with attn_mask"
        if attn_mask.dtype not in (torch.bool, query.dtype):
            return f"an additive attn_mask of dtype {attn_mask.dtype} (not query's)"
        if attn_mask.requires_grad and torch.is_grad_enabled():
            return "an attn_mask that requires grad"
    return None


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: the same signature and
    semantics, computed by :func:`attention` (flash attention, memory linear in the sequence
    lengths, GQA without repeating K/V, fused backward).

    Calls the op can not serve (``dropout_p > 0``, inputs that are not 4-D, a batch
    broadcast, an additive mask of another dtype, a device without a metalcore kernel) run
    ``torch.nn.functional.scaled_dot_product_attention`` instead, with a warning the first time
    each reason occurs: never silently.
    """
    from ._checks import check_float, check_same_device, check_same_dtype

    for arg, t in (("query", query), ("key", key), ("value", value)):
        check_float(_SDPA, arg, t)
    check_same_device(_SDPA, "key", key, "query", query)
    check_same_device(_SDPA, "value", value, "query", query)
    check_same_dtype(_SDPA, "key", key, "query", query)
    check_same_dtype(_SDPA, "value", value, "query", query)
    if attn_mask is not None:
        check_same_device(_SDPA, "attn_mask", attn_mask, "query", query)
    reason = _sdpa_fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if reason is not None:
        if reason not in _sdpa_warned:
            _sdpa_warned.add(reason)
            import warnings

            warnings.warn(
                f"metalcore.{_SDPA}: {reason}; calling "
                "torch.nn.functional.scaled_dot_product_attention instead",
                stacklevel=2,
            )
        return torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    return _ops.attention(query, key, value, attn_mask, scale, is_causal)[0]


# --- Softmax -----------------------------------------------------------------------------------


def softmax(input: Tensor, dim: int) -> Tensor:
    """Softmax over ``dim``: ``exp(x - max) / sum(exp(x - max))``, as ``torch.softmax``.

    Any dim of a float16/bfloat16/float32/float64 tensor (float32 accumulation for the 16-bit
    types); the output has the input's shape and dtype. A slice of all ``-inf`` gives NaN, as
    in torch. The gradient runs ``metalcore::softmax_backward`` on the output.
    """
    return _ops.softmax(input, dim)


def log_softmax(input: Tensor, dim: int) -> Tensor:
    """``log(softmax(input, dim))`` computed stably as ``(x - max) - log(sum(exp(x - max)))``,
    as ``torch.log_softmax``. The gradient runs ``metalcore::log_softmax_backward``."""
    return _ops.log_softmax(input, dim)


# --- Cross-entropy -----------------------------------------------------------------------------


def cross_entropy(
    input: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy of logits ``input`` [N, C] against class indices ``target`` [N] (int64),
    as ``torch.nn.functional.cross_entropy`` with class-index targets.

    Rows whose target is ``ignore_index`` contribute 0 and are not counted by ``'mean'`` (a
    batch with every row ignored gives NaN, as torch). ``label_smoothing`` mixes the one-hot
    target with the uniform distribution. ``reduction``: ``'mean'`` (default), ``'sum'`` or
    ``'none'`` ([N] losses). float16/bfloat16 logits are accumulated in float32; the loss has
    the input's dtype. Targets outside ``[0, C)`` that are not ``ignore_index`` raise
    ``ValueError``. The backward (``metalcore::cross_entropy_backward``) computes the logits'
    gradient in one pass over each row.
    """
    return _ops.cross_entropy(input, target, ignore_index, reduction, label_smoothing)


def fused_linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """``cross_entropy(input @ weight.T + bias, target, ...)`` without materializing the logits.

    The LM head and the loss in one op: ``input`` [N, H] hidden states (leading dims are
    flattened: [..., H] with ``target`` [...]), ``weight`` [V, H], ``bias`` [V] or None,
    ``target`` int64 class indices. The logits are computed in chunks of tokens (at most 2^21
    logits, 8 MiB in float32, at a time), so the extra memory does not grow with N x V; the
    backward recomputes each chunk's logits and returns the gradients of ``input``, ``weight``
    and ``bias``. Semantics (``ignore_index``, ``reduction``, ``label_smoothing``, float32
    accumulation for 16-bit inputs) are :func:`cross_entropy`'s. With ``reduction='none'`` the
    loss has ``target``'s shape.
    """
    shape = None
    if isinstance(input, Tensor) and isinstance(target, Tensor) and input.dim() > 2:
        shape = target.shape
        input = input.reshape(-1, input.shape[-1])
        target = target.reshape(-1)
    loss = _ops.fused_linear_cross_entropy(
        input, weight, target, bias, ignore_index, reduction, label_smoothing
    )
    if shape is not None and reduction == "none":
        loss = loss.reshape(shape)
    return loss


# --- embedding_bag ---------------------------------------------------------------------------


def embedding_bag(
    input: Tensor,
    weight: Tensor,
    offsets: Tensor | None = None,
    mode: str = "mean",
    per_sample_weights: Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> Tensor:
    """Sums, means or maxima of bags of embedding rows, as ``torch.nn.functional.embedding_bag``.

    ``input`` is 1-D indices into ``weight`` [V, D] with ``offsets`` (the start of each bag; with
    ``include_last_offset=True`` the last offset is the end of the last bag), or 2-D [B, L]
    (B bags of L indices, ``offsets`` None). ``mode``: ``'sum'``, ``'mean'`` (default) or
    ``'max'``; ``per_sample_weights`` [N] (mode ``'sum'`` only) scales each row; rows equal to
    ``padding_idx`` are skipped and not counted by ``'mean'``; an empty bag gives zeros. Returns
    [B, D] in the weight's dtype (float32 accumulation for 16-bit weights). Indices outside
    ``[0, V)`` and malformed offsets raise ``ValueError`` naming the argument. The backward
    (``metalcore::embedding_bag_backward``) gives a dense weight gradient summed per row in a
    fixed order, so it is deterministic, and the gradient of ``per_sample_weights``.
    """
    if isinstance(input, Tensor) and input.dim() == 2:
        if offsets is not None:
            raise ValueError(
                "metalcore.embedding_bag: 'offsets' must be None when 'input' is 2-D "
                "(each row is one bag)"
            )
        bags, length = input.shape
        offsets = torch.arange(0, bags * length, length, dtype=input.dtype, device=input.device)
        input = input.reshape(-1)
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.reshape(-1)
    elif isinstance(input, Tensor) and input.dim() == 1 and offsets is None:
        raise ValueError("metalcore.embedding_bag: 'offsets' must be given when 'input' is 1-D")
    return _ops.embedding_bag(
        weight, input, offsets, mode, per_sample_weights, include_last_offset, padding_idx
    )


# --- LoRA linear -----------------------------------------------------------------------------


def lora_linear(
    input: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    bias: Tensor | None = None,
) -> Tensor:
    """``F.linear(input, weight, bias) + scaling * (input @ lora_a.T) @ lora_b.T`` as one op.

    PEFT's layout: ``input`` [..., in], ``weight`` [out, in] (the base layer's), ``lora_a``
    [r, in], ``lora_b`` [out, r], ``bias`` [out] or None; all of one dtype and device. The
    low-rank path goes through the [..., r] activations, never forming ``scaling * lora_b @
    lora_a``. The backward (``metalcore::lora_linear_backward``) gives the gradients of
    ``input``, ``lora_a``, ``lora_b`` and ``bias``, and of ``weight`` only when the weight
    requires grad (a frozen base weight costs no [out, in] product). CPU and CUDA (ATen's BLAS);
    no Metal kernel yet.
    """
    return _ops.lora_linear(input, weight, lora_a, lora_b, scaling, bias)
