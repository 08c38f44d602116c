"""Pure-PyTorch reference implementations, written out independently of the kernels.

Tests compare the ops against these (in float64 where the op's dtype allows) and benchmarks use
them as the "eager" and "torch.compile" baselines. They follow the formulations of PyTorch and
Hugging Face transformers (LlamaRMSNorm, apply_rotary_pos_emb, LlamaMLP) without importing them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rmsnorm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm computed in float64 (or float32 math upcast), returned in x's dtype."""
    acc = torch.float64
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(acc)
    return y.to(x.dtype)


def hf_llama_rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' LlamaRMSNorm.forward, written out (rounds before the weight multiply)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


def fused_add_rmsnorm(
    x: Tensor, residual: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    h = x + residual  # rounded to the input dtype, as unfused code would
    return rmsnorm(h, weight, eps), h


# --- Activations -----------------------------------------------------------------------------


def silu(x: Tensor) -> Tensor:
    xd = x.double()
    return (xd * torch.sigmoid(xd)).to(x.dtype)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    xd = x.double()
    if approximate == "tanh":
        inner = (2.0 / torch.pi) ** 0.5 * (xd + 0.044715 * xd.pow(3))
        # 0.5 x (1 + tanh u) = x sigmoid(2u): 1 + tanh u cancels in the negative tail, even in
        # float64.
        y = xd * torch.sigmoid(2.0 * inner)
    else:
        # Phi = erfc(-x / sqrt 2) / 2: 1 + erf cancels in the negative tail, even in float64.
        y = 0.5 * xd * torch.erfc(-xd / 2.0**0.5)
    return y.to(x.dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    g = gate.double()
    return (g * torch.sigmoid(g) * up.double()).to(gate.dtype)


def hf_llama_mlp(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """transformers' LlamaMLP.forward: down_proj(act_fn(gate_proj(x)) * up_proj(x)), act=silu."""
    gate = torch.nn.functional.linear(x, w_gate)
    up = torch.nn.functional.linear(x, w_up)
    return torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w_down)


# --- Backward references (closed forms in float64) -------------------------------------------
# Written as the documented derivative formulas rather than autograd of the forward references:
# autograd expands them into sums of terms (g*s + g*x*s') that turn an infinite grad_out into
# inf - inf = NaN even where the derivative is finite and non-zero.


def _opmath_range(d: Tensor, dtype: torch.dtype) -> Tensor:
    """Derivative factors as the kernels' opmath holds them: for float32, float16 and bfloat16
    inputs the kernels compute in float32, where a factor below its normal range (sigmoid(-100),
    exp(-x^2/2) for |x| > 13) is zero, so an infinite grad_out times it is NaN there."""
    if dtype == torch.float64:
        return d
    return torch.where(d.abs() < torch.finfo(torch.float32).tiny, torch.zeros_like(d), d)


def sigmoid_opmath(x: Tensor, dtype: torch.dtype) -> Tensor:
    """sigmoid in float64, with values below the normal range of the kernels' float32 opmath
    flushed to 0 (for x < -87 the kernels' 1 / (1 + exp(-x)) is 0 there), for inputs of
    ``dtype``."""
    return _opmath_range(torch.sigmoid(x.double()), dtype)


def silu_opmath(x: Tensor) -> Tensor:
    """silu in float64 with the kernels' float32 sigmoid range (see :func:`sigmoid_opmath`)."""
    return x.double() * sigmoid_opmath(x, x.dtype)


def silu_backward(grad_out: Tensor, x: Tensor) -> Tensor:
    xd = x.double()
    s = sigmoid_opmath(xd, x.dtype)
    return grad_out.double() * _opmath_range(s * (1.0 + xd * (1.0 - s)), x.dtype)


def gelu_backward(grad_out: Tensor, x: Tensor, approximate: str = "none") -> Tensor:
    xd = x.double()
    if approximate == "tanh":
        k = (2.0 / torch.pi) ** 0.5
        # s = sigmoid(2u) = (1 + tanh u) / 2 and 1 - tanh^2 u = 4 s (1 - s), without cancellation.
        s = torch.sigmoid(2.0 * k * (xd + 0.044715 * xd.pow(3)))
        # s (1 - s) is exactly 0 for |x| > ~40: capping x^2 keeps 0 * inf (NaN) out for huge x.
        x2 = (xd * xd).clamp(max=1e4)
        d = s + 2.0 * s * (1.0 - s) * xd * k * (1.0 + 3 * 0.044715 * x2)
    else:
        cdf = 0.5 * torch.erfc(-xd / 2.0**0.5)
        d = cdf + xd * torch.exp(-0.5 * xd * xd) / (2.0 * torch.pi) ** 0.5
    return grad_out.double() * _opmath_range(d, x.dtype)


def swiglu_backward(grad_out: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    g, a = grad_out.double(), gate.double()
    s = sigmoid_opmath(a, gate.dtype)
    d = _opmath_range(s * (1.0 + a * (1.0 - s)), gate.dtype)
    return g * d * up.double(), g * _opmath_range(a * s, gate.dtype)


def rmsnorm_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor | None]:
    """(grad_input, grad_weight) of rmsnorm: with r = rsqrt(mean(x^2) + eps) and gw = g * w,
    dx = r * gw - x * r^3 * mean(gw * x) and dw = sum over rows of g * x * r."""
    g, xd = grad_out.double(), x.double()
    r = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    gw = g * weight.double() if weight is not None else g
    dx = r * gw - xd * (r.pow(3) * (gw * xd).mean(-1, keepdim=True))
    dw = None
    if weight is not None:
        per_row = g * xd * r
        dw = per_row.sum(tuple(range(x.dim() - 1))) if x.dim() > 1 else per_row
    return dx, dw


@torch.no_grad()
def adamw_step_reference(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    state_steps,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool = False,
    maximize: bool = False,
) -> None:
    """One AdamW step in place, with torch.optim.AdamW's math done in float64 and each updated
    tensor rounded once to its stored dtype (what a fused kernel computing in high precision
    does). Increments ``state_steps`` and uses the new value, like ``metalcore.adamw_step``."""
    lr = float(lr)
    f64 = torch.float64
    for i, p in enumerate(params):
        state_steps[i] += 1
        step = float(state_steps[i])
        g = grads[i].to(f64)
        if maximize:
            g = -g
        p64 = p.to(f64) * (1 - lr * weight_decay)
        m = exp_avgs[i].to(f64).lerp(g, 1 - beta1)
        v = exp_avg_sqs[i].to(f64) * beta2 + (1 - beta2) * g * g
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        # The update sees the moments as stored.
        m = exp_avgs[i].to(f64)
        v = exp_avg_sqs[i].to(f64)
        if amsgrad:
            v = torch.maximum(max_exp_avg_sqs[i].to(f64), v)
            max_exp_avg_sqs[i].copy_(v)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = v.sqrt() / bias_correction2_sqrt + eps
        p.copy_(p64 - (lr / bias_correction1) * (m / denom))


# --- RoPE --------------------------------------------------------------------------------------


def rotate_half(x: Tensor) -> Tensor:
    """transformers' rotate_half: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x: Tensor) -> Tensor:
    """transformers' GPT-J rotate_every_two: pairs (2i, 2i+1) -> (-x[2i+1], x[2i])."""
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _apply_rotary(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int, rotate
) -> tuple[Tensor, Tensor]:
    # [B, S, R] tables broadcast over heads after unsqueeze(1); [S, R] tables broadcast as they are.
    if cos.dim() == 3:
        cos = cos.unsqueeze(unsqueeze_dim)
        sin = sin.unsqueeze(unsqueeze_dim)
    rot = cos.shape[-1]
    # Partial rotary (as transformers' partial-rotary models): rotate the first `rot` features,
    # pass the rest through.
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    q_embed = (q_rot * cos) + (rotate(q_rot) * sin)
    k_embed = (k_rot * cos) + (rotate(k_rot) * sin)
    return torch.cat((q_embed, q_pass), dim=-1), torch.cat((k_embed, k_pass), dim=-1)


def hf_apply_rotary_pos_emb(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1
) -> tuple[Tensor, Tensor]:
    """transformers' Llama apply_rotary_pos_emb (rotate_half), written out, in the inputs' dtype.

    q: [B, Hq, S, D], k: [B, Hk, S, D]; cos/sin: [B or 1, S, R] (or [S, R]), R <= D.
    """
    return _apply_rotary(q, k, cos, sin, unsqueeze_dim, rotate_half)


def gptj_apply_rotary_pos_emb(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1
) -> tuple[Tensor, Tensor]:
    """GPT-J's interleaved rotary (rotate_every_two) with per-position cos/sin, in the HF layout."""
    return _apply_rotary(q, k, cos, sin, unsqueeze_dim, rotate_every_two)


def rope(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False
) -> tuple[Tensor, Tensor]:
    """metalcore.rope's reference: computed in float64, returned in q/k's dtype."""
    fn = gptj_apply_rotary_pos_emb if interleaved else hf_apply_rotary_pos_emb
    acc = torch.float64
    q_out, k_out = fn(q.to(acc), k.to(acc), cos.to(acc), sin.to(acc))
    return q_out.to(q.dtype), k_out.to(k.dtype)
