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
        y = 0.5 * xd * (1.0 + torch.tanh(inner))
    else:
        y = 0.5 * xd * (1.0 + torch.erf(xd / 2.0**0.5))
    return y.to(x.dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    g = gate.double()
    return (g * torch.sigmoid(g) * up.double()).to(gate.dtype)


def hf_llama_mlp(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """transformers' LlamaMLP.forward: down_proj(act_fn(gate_proj(x)) * up_proj(x)), act=silu."""
    gate = torch.nn.functional.linear(x, w_gate)
    up = torch.nn.functional.linear(x, w_up)
    return torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w_down)


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
