"""Fake (meta) implementations of every metalcore op.

FakeTensor tracing (``torch.compile``, ``torch.export``, ``opcheck``) runs these instead of a
kernel: they read only shapes, dtypes and devices, use symbolic sizes as given (so a new batch size
does not recompile), and return tensors with exactly the strides the real kernels produce
(contiguous). Value checks that decide output shapes use ``torch._check`` so that tracing fails
with the same message eager mode gives.
"""

from __future__ import annotations

import torch
from torch.library import register_fake


def _check_same_device(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(
                f"metalcore.{op}: '{name}' must be on the same device as '{ref_name}' "
                f"({ref.device}), got {t.device}"
            )


def _check_rmsnorm_weight(
    op: str, input: torch.Tensor, weight: torch.Tensor | None, input_name: str = "input"
) -> None:
    _check_same_device(op, input_name, input, weight=weight)
    if weight is not None:
        torch._check(
            weight.dim() == 1 and weight.shape[0] == input.shape[-1],
            lambda: (
                f"metalcore.{op}: 'weight' must have shape [{input.shape[-1]}] "
                f"(the last dim of '{input_name}'), got {list(weight.shape)}"
            ),
        )


# --- RMSNorm -----------------------------------------------------------------------------------


@register_fake("metalcore::rmsnorm")
def _rmsnorm(input, weight, eps):
    _check_rmsnorm_weight("rmsnorm", input, weight)
    return input.new_empty(input.shape)


@register_fake("metalcore::rmsnorm_backward")
def _rmsnorm_backward(grad_out, input, weight, eps):
    _check_rmsnorm_weight("rmsnorm_backward", input, weight)
    n = input.shape[-1] if weight is not None else 0
    return input.new_empty(input.shape), input.new_empty((n,))


@register_fake("metalcore::fused_add_rmsnorm")
def _fused_add_rmsnorm(input, residual, weight, eps):
    _check_rmsnorm_weight("fused_add_rmsnorm", input, weight)
    torch._check(
        residual.shape == input.shape,
        lambda: "metalcore.fused_add_rmsnorm: 'residual' must have the same shape as 'input'",
    )
    return input.new_empty(input.shape), input.new_empty(input.shape)


@register_fake("metalcore::fused_add_rmsnorm_backward")
def _fused_add_rmsnorm_backward(grad_out, grad_residual_out, residual_out, weight, eps):
    _check_rmsnorm_weight("fused_add_rmsnorm_backward", residual_out, weight, "residual_out")
    n = residual_out.shape[-1] if weight is not None else 0
    return residual_out.new_empty(residual_out.shape), residual_out.new_empty((n,))


# --- Activations -------------------------------------------------------------------------------


def _check_approximate(op: str, approximate: str) -> None:
    if approximate not in ("none", "tanh"):
        raise ValueError(
            f"metalcore.{op}: 'approximate' must be 'none' or 'tanh', got {approximate!r}"
        )


@register_fake("metalcore::silu")
def _silu(input):
    return input.new_empty(input.shape)


@register_fake("metalcore::silu_backward")
def _silu_backward(grad_out, input):
    return input.new_empty(input.shape)


@register_fake("metalcore::gelu")
def _gelu(input, approximate="none"):
    _check_approximate("gelu", approximate)
    return input.new_empty(input.shape)


@register_fake("metalcore::gelu_backward")
def _gelu_backward(grad_out, input, approximate="none"):
    _check_approximate("gelu_backward", approximate)
    return input.new_empty(input.shape)


@register_fake("metalcore::swiglu")
def _swiglu(gate, up):
    torch._check(
        gate.shape == up.shape,
        lambda: "metalcore.swiglu: 'up' must have the same shape as 'gate'",
    )
    return gate.new_empty(gate.shape)


@register_fake("metalcore::swiglu_backward")
def _swiglu_backward(grad_out, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


# --- RoPE --------------------------------------------------------------------------------------


def _check_rope(op: str, q_name: str, q, k_name: str, k, cos, sin) -> None:
    # The same checks, in the same order and wording, as csrc/rope/rope.h.
    _check_same_device(op, q_name, q, **{k_name: k, "cos": cos, "sin": sin})
    if k.dtype != q.dtype:
        raise TypeError(
            f"metalcore.{op}: '{k_name}' must have the same dtype as '{q_name}' ({q.dtype}), "
            f"got {k.dtype}"
        )
    reduced = q.dtype in (torch.float16, torch.bfloat16)
    if not (cos.dtype == q.dtype or (reduced and cos.dtype == torch.float32)):
        raise TypeError(
            f"metalcore.{op}: 'cos' must have the same dtype as '{q_name}' ({q.dtype})"
            f"{' or float32' if reduced else ''}, got {cos.dtype}"
        )
    if sin.dtype != cos.dtype:
        raise TypeError(
            f"metalcore.{op}: 'sin' must have the same dtype as 'cos' ({cos.dtype}), "
            f"got {sin.dtype}"
        )
    for name, t in ((q_name, q), (k_name, k)):
        torch._check(
            t.dim() == 4,
            lambda t=t, name=name: (
                f"metalcore.{op}: '{name}' must be 4-D "
                f"[batch, heads, seq, head_dim], got shape {list(t.shape)}"
            ),
        )
    b, s, d = q.shape[0], q.shape[2], q.shape[3]
    torch._check(
        k.shape[0] == b and k.shape[2] == s and k.shape[3] == d,
        lambda: (
            f"metalcore.{op}: '{k_name}' must have the batch, seq and head_dim of "
            f"'{q_name}' {list(q.shape)}, got shape {list(k.shape)}"
        ),
    )
    torch._check(
        cos.dim() in (2, 3),
        lambda: (
            f"metalcore.{op}: 'cos' must be 2-D [seq, rot] or 3-D [batch or 1, seq, rot], "
            f"got shape {list(cos.shape)}"
        ),
    )
    torch._check(
        sin.shape == cos.shape,
        lambda: (
            f"metalcore.{op}: 'sin' must have the same shape as 'cos' {list(cos.shape)}, "
            f"got {list(sin.shape)}"
        ),
    )
    torch._check(
        cos.shape[-2] == s,
        lambda: (
            f"metalcore.{op}: 'cos' must have seq = {s} (dim 2 of '{q_name}') in dim -2, "
            f"got shape {list(cos.shape)}"
        ),
    )
    if cos.dim() == 3:
        torch._check(
            cos.shape[0] == 1 or cos.shape[0] == b,
            lambda: (
                f"metalcore.{op}: 'cos' must have batch 1 or {b} in dim 0, "
                f"got shape {list(cos.shape)}"
            ),
        )
    rot = cos.shape[-1]
    torch._check(
        rot % 2 == 0 and rot <= d,
        lambda: (
            f"metalcore.{op}: 'cos' last dim (rot) must be even and <= head_dim = {d}, got {rot}"
        ),
    )


@register_fake("metalcore::rope")
def _rope(q, k, cos, sin, interleaved=False):
    _check_rope("rope", "q", q, "k", k, cos, sin)
    return q.new_empty(q.shape), k.new_empty(k.shape)


@register_fake("metalcore::rope_backward")
def _rope_backward(grad_q_out, grad_k_out, cos, sin, interleaved=False):
    _check_rope("rope_backward", "grad_q_out", grad_q_out, "grad_k_out", grad_k_out, cos, sin)
    return grad_q_out.new_empty(grad_q_out.shape), grad_k_out.new_empty(grad_k_out.shape)


# --- AdamW -------------------------------------------------------------------------------------


@register_fake("metalcore::adamw")
def _adamw(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    state_steps,
    lr,
    beta1,
    beta2,
    weight_decay,
    eps,
    amsgrad=False,
    maximize=False,
):
    # Same structural checks as the kernels (values such as lr are not readable here), so that
    # tracing and mixed-device calls that land on the Meta kernel fail like eager calls do.
    op = "adamw"
    n = len(params)
    lists = dict(grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, state_steps=state_steps)
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(
                f"metalcore.{op}: '{name}' must have one tensor per param ({n}), got {len(lst)}"
            )
    if amsgrad and len(max_exp_avg_sqs) != n:
        raise ValueError(
            f"metalcore.{op}: 'max_exp_avg_sqs' must have one tensor per param ({n}) when "
            f"amsgrad=True, got {len(max_exp_avg_sqs)}"
        )
    if not amsgrad and len(max_exp_avg_sqs) != 0:
        raise ValueError(
            f"metalcore.{op}: 'max_exp_avg_sqs' must be empty when amsgrad=False, got "
            f"{len(max_exp_avg_sqs)} tensor(s)"
        )
    for i, p in enumerate(params):
        g = grads[i]
        if g.dtype != p.dtype:
            raise TypeError(
                f"metalcore.{op}: 'grads[{i}]' must have the same dtype as 'params[{i}]' "
                f"({p.dtype}), got {g.dtype}"
            )
        states = {"grads": g, "exp_avgs": exp_avgs[i], "exp_avg_sqs": exp_avg_sqs[i]}
        if amsgrad:
            states["max_exp_avg_sqs"] = max_exp_avg_sqs[i]
        _check_same_device(op, f"params[{i}]", p, **{f"{k}[{i}]": t for k, t in states.items()})
        for k, t in states.items():
            torch._check(
                t.shape == p.shape,
                lambda k=k, t=t, p=p, i=i: (
                    f"metalcore.{op}: '{k}[{i}]' must have the same shape as "
                    f"'params[{i}]' {list(p.shape)}, got {list(t.shape)}"
                ),
            )
    return None
