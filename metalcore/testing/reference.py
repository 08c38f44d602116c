"""Pure-PyTorch reference implementations, written out independently of the kernels.

Tests compare the ops against these (in float64 where the op's dtype allows) and benchmarks use
them as the "eager" and "torch.compile" baselines. They follow the formulations of PyTorch and
Hugging Face transformers (LlamaRMSNorm, apply_rotary_pos_emb, LlamaMLP) without importing them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rms_rstd(x: Tensor, eps: float, opmath: torch.dtype | None = None) -> Tensor:
    """1 / sqrt(mean(x^2, -1) + eps) in float64, keepdim. With ``opmath=torch.float32`` it
    models the one thing float32 accumulation cannot do: squares below float32's normal range
    land on its subnormal grid (those below its smallest subnormal vanish), and eps is rounded
    to float32, so a row of denormals with eps ~ 0 normalizes by inf as the kernels (and
    torch's own float32 rms_norm) do, not by its float64 value."""
    xd = x.to(torch.float64)
    sq = xd * xd
    if opmath == torch.float32:
        tiny = torch.finfo(torch.float32).tiny
        sq = torch.where(sq < tiny, sq.float().double(), sq)
        eps = float(torch.tensor(eps, dtype=torch.float32))
    return torch.rsqrt(sq.mean(-1, keepdim=True) + eps)


def rmsnorm(
    x: Tensor, weight: Tensor | None, eps: float, opmath: torch.dtype | None = None
) -> Tensor:
    """RMSNorm computed in float64, returned in x's dtype (see :func:`rms_rstd` for
    ``opmath``)."""
    acc = torch.float64
    xf = x.to(acc)
    y = xf * rms_rstd(xf, eps, opmath)
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
    # silu(gate) = gate * s is not flushed: where s is, it is 0 already; a denormal gate gives
    # a denormal silu, which float32 holds (an infinite grad_out times it is inf, not NaN).
    return g * d * up.double(), g * (a * s)


def rmsnorm_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    eps: float,
    opmath: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(grad_input, grad_weight) of rmsnorm: with r = rsqrt(mean(x^2) + eps) and gw = g * w,
    dx = r * gw - x * r^3 * mean(gw * x) and dw = sum over rows of g * x * r (see
    :func:`rms_rstd` for ``opmath``)."""
    g, xd = grad_out.double(), x.double()
    r = rms_rstd(xd, eps, opmath)
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


# --- Linear algebra ----------------------------------------------------------------------------
# float64 torch.linalg (LAPACK) on the part of each matrix the op reads, with metalcore's rule
# for the failures torch.linalg reports differently per backend and LAPACK version: a matrix
# whose read part holds a non-finite value gets all-NaN outputs and info > 0.


def read_triangle(A: Tensor, upper: bool) -> Tensor:
    """The symmetric matrix a one-triangle op sees: the read triangle, mirrored."""
    t = A.triu() if upper else A.tril()
    return t + t.mT - torch.diag_embed(t.diagonal(dim1=-2, dim2=-1))


def _finite_matrices(A: Tensor) -> Tensor:
    return torch.isfinite(A).flatten(-2).all(-1)


def cholesky_ex(A: Tensor, upper: bool = False) -> tuple[Tensor, Tensor]:
    """(factor, info) in float64. info = the order of the first leading minor of the read
    triangle that is not positive definite or holds a non-finite value; that matrix's factor is
    all NaN."""
    S = read_triangle(A.double(), upper)
    n = S.shape[-1]
    flat = S.reshape(math.prod(S.shape[:-2]), n, n)
    L = torch.empty_like(flat)
    info = torch.zeros(flat.shape[0], dtype=torch.int32)
    for b in range(flat.shape[0]):
        whole_ok = torch.isfinite(flat[b]).all() and torch.linalg.cholesky_ex(flat[b]).info == 0
        for k in range(1, n + 1 if not whole_ok else 1):
            lead = flat[b, :k, :k]
            if not torch.isfinite(lead).all() or torch.linalg.cholesky_ex(lead).info != 0:
                info[b] = k
                break
        if info[b]:
            L[b] = float("nan")
        else:
            L[b] = torch.linalg.cholesky(flat[b], upper=upper) if n else flat[b]
    return L.reshape(S.shape), info.reshape(S.shape[:-2])


def solve_triangular(
    A: Tensor, B: Tensor, upper: bool, left: bool = True, unitriangular: bool = False
) -> Tensor:
    return torch.linalg.solve_triangular(
        A.double(), B.double(), upper=upper, left=left, unitriangular=unitriangular
    )


def eigh(A: Tensor, UPLO: str = "L") -> tuple[Tensor, Tensor, Tensor]:
    S = read_triangle(A.double(), UPLO.upper() == "U")
    ok = _finite_matrices(S)
    w, V = torch.linalg.eigh(torch.where(ok[..., None, None], S, 0.0))
    nan = float("nan")
    w = torch.where(ok[..., None], w, nan)
    V = torch.where(ok[..., None, None], V, nan)
    return w, V, (~ok).to(torch.int32)


def svd(A: Tensor, full_matrices: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    A = A.double()
    ok = _finite_matrices(A)
    U, S, Vh = torch.linalg.svd(torch.where(ok[..., None, None], A, 0.0), full_matrices)
    nan = float("nan")
    U = torch.where(ok[..., None, None], U, nan)
    S = torch.where(ok[..., None], S, nan)
    Vh = torch.where(ok[..., None, None], Vh, nan)
    return U, S, Vh, (~ok).to(torch.int32)


# --- Weight-only quantization ----------------------------------------------------------------
# Written element by element from the format descriptions (ggml-common.h's block structs, the
# reference quantizers' rules, MLX's affine rule) in NumPy, sharing no code with metalcore.quant
# or the kernels. Everything dequantizes to float64 holding llama.cpp's float32 values exactly
# (its products are exact; Q4_K's one float32 rounding is applied).

# ggml type id -> (weights per block, bytes per block)
GGUF_BLOCKS = {2: (32, 18), 8: (32, 34), 12: (256, 144), 14: (256, 210)}


def _np(t):
    import numpy as np

    return t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)


def _f16(b, at: int):
    """The little-endian fp16 at byte offset ``at`` of each block (float64)."""
    import numpy as np

    return b[..., at : at + 2].copy().view(np.float16)[..., 0].astype(np.float64)


def gguf_dequantize(data, qtype: int) -> Tensor:
    """Float64 weights [rows, K] of GGUF blocks ``data`` (uint8 [rows, row_bytes])."""
    import numpy as np

    raw = _np(data).astype(np.uint8)
    bs, ts = GGUF_BLOCKS[qtype]
    rows = raw.shape[0]
    nb = raw.shape[1] // ts
    b = raw.reshape(rows, nb, ts)
    out = np.zeros((rows, nb, bs), dtype=np.float64)
    if qtype == 2:  # Q4_0: d, then byte j = element j (low nibble) | element j+16 (high)
        d = _f16(b, 0)[..., None]
        qs = b[..., 2:].astype(np.int64)
        out[..., :16] = d * ((qs & 15) - 8)
        out[..., 16:] = d * ((qs >> 4) - 8)
    elif qtype == 8:  # Q8_0: d, 32 int8
        out[:] = _f16(b, 0)[..., None] * b[..., 2:].view(np.int8).astype(np.float64)
    elif qtype == 12:  # Q4_K: d, dmin, 12 bytes of 6-bit scales/mins, 128 nibble bytes
        d, dmin = _f16(b, 0), _f16(b, 2)
        s = b[..., 4:16].astype(np.int64)
        qs = b[..., 16:].astype(np.int64)
        for j in range(8):
            if j < 4:
                sc, mn = s[..., j] & 63, s[..., j + 4] & 63
            else:
                sc = (s[..., j + 4] & 15) | ((s[..., j - 4] >> 6) << 4)
                mn = (s[..., j + 4] >> 4) | ((s[..., j] >> 6) << 4)
            chunk = qs[..., 32 * (j // 2) : 32 * (j // 2) + 32]
            q = (chunk >> (4 * (j % 2))) & 15
            # Both products are exact; ggml rounds their difference to float32 once.
            v = (d * sc)[..., None] * q - (dmin * mn)[..., None]
            out[..., 32 * j : 32 * j + 32] = v.astype(np.float32)
    elif qtype == 14:  # Q6_K: ql[128], qh[64], int8 scales[16], d
        ql = b[..., :128].astype(np.int64)
        qh = b[..., 128:192].astype(np.int64)
        sc = b[..., 192:208].view(np.int8).astype(np.float64)
        d = _f16(b, 208)
        for k in range(256):
            half, r, pos = k // 128, (k % 128) // 32, k % 32
            low = (ql[..., 64 * half + pos + 32 * (r % 2)] >> (4 * (r // 2))) & 15
            high = (qh[..., 32 * half + pos] >> (2 * r)) & 3
            q = (low | (high << 4)) - 32
            out[..., k] = d * sc[..., 8 * half + 2 * r + pos // 16] * q
    else:
        raise ValueError(f"unknown ggml type {qtype}")
    return torch.from_numpy(out.reshape(rows, nb * bs))


def gguf_quantize(weight, qtype: int):
    """llama.cpp's ``quantize_row_q4_0_ref`` / ``quantize_row_q8_0_ref`` (float32 arithmetic,
    fp16 d rounded to nearest even), block by block: uint8 [rows, row_bytes] as a NumPy array."""
    import numpy as np

    w = _np(weight).astype(np.float32)
    rows, k = w.shape
    out = []
    for blk in w.reshape(-1, 32):
        if qtype == 8:
            amax = np.float32(np.max(np.abs(blk)))
            d = np.float32(amax / np.float32(127))
            inv = np.float32(1) / d if d != 0 else np.float32(0)
            # roundf: halves away from zero
            q = [int(np.sign(v) * np.floor(abs(float(v)) + 0.5)) for v in blk * inv]
            out.append(np.array([d], dtype=np.float32).astype(np.float16).view(np.uint8))
            out.append(np.array(q, dtype=np.int8).view(np.uint8))
        elif qtype == 2:
            i = 0
            for j in range(32):  # the first element of largest magnitude, sign kept
                if abs(blk[j]) > abs(blk[i]):
                    i = j
            d = np.float32(blk[i] / np.float32(-8))
            inv = np.float32(1) / d if d != 0 else np.float32(0)
            q = [min(15, int(np.float32(np.float32(v * inv) + np.float32(8.5)))) for v in blk]
            out.append(np.array([d], dtype=np.float32).astype(np.float16).view(np.uint8))
            out.append(np.array([q[j] | (q[j + 16] << 4) for j in range(16)], dtype=np.uint8))
        else:
            raise ValueError(f"no reference quantizer for ggml type {qtype}")
    return np.concatenate(out).reshape(rows, -1)


def mlx_affine_quantize(weight, group_size: int, bits: int):
    """MLX's affine quantizer (``mx.quantize``): codes [N, K] in 0..2^bits-1 (unpacked), scales
    and biases [N, K/group_size], all float32 NumPy arrays, group by group."""
    import numpy as np

    w = _np(weight).astype(np.float32)
    n, k = w.shape
    levels = np.float32(2**bits - 1)
    codes = np.zeros((n, k), dtype=np.int64)
    scales = np.zeros((n, k // group_size), dtype=np.float32)
    biases = np.zeros_like(scales)
    for r in range(n):
        for g in range(k // group_size):
            x = w[r, g * group_size : (g + 1) * group_size]
            hi, lo = x.max(), x.min()
            s0 = max(np.float32((hi - lo) / levels), np.float32(1e-7))
            edge, s = (lo, s0) if abs(lo) > abs(hi) else (hi, -s0)
            q0 = np.rint(np.float32(edge / s))
            if q0 != 0:
                s, b = np.float32(edge / q0), edge
            else:
                b = np.float32(0)
            codes[r, g * group_size : (g + 1) * group_size] = np.clip(
                np.rint(((x - b) / s).astype(np.float32)), 0, levels
            )
            scales[r, g], biases[r, g] = s, b
    return codes, scales, biases


def affine_dequantize(qweight: Tensor, scales: Tensor, biases: Tensor, group_size: int, bits: int):
    """Float64 weights [N, K] of an affine INT4 (low nibble = even k) or INT8 weight."""
    q = qweight.to(torch.int64)
    if bits == 4:
        q = torch.stack([q & 15, q >> 4], dim=-1).reshape(q.shape[0], 2 * q.shape[1])
    s = scales.double().repeat_interleave(group_size, dim=1)
    b = biases.double().repeat_interleave(group_size, dim=1)
    return q.double() * s + b


# --- LayerNorm -----------------------------------------------------------------------------------


def layer_norm_stats(
    x: Tensor, eps: float, opmath: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Mean and 1 / sqrt(var + eps) over the last dim (biased variance), in float64, keepdim.
    With ``opmath=torch.float32`` it models what float32 accumulation cannot hold, as
    :func:`rms_rstd` does: squared deviations below float32's normal range land on its
    subnormal grid, and eps is rounded to float32."""
    xd = x.to(torch.float64)
    mean = xd.mean(-1, keepdim=True)
    # One correction step makes the float64 mean exact for rows of equal values (whose variance
    # is then exactly 0, not the square of the mean's rounding error).
    mean = mean + (xd - mean).mean(-1, keepdim=True)
    sq = (xd - mean) ** 2
    if opmath == torch.float32:
        tiny = torch.finfo(torch.float32).tiny
        sq = torch.where(sq < tiny, sq.float().double(), sq)
        eps = float(torch.tensor(eps, dtype=torch.float32))
    return mean, torch.rsqrt(sq.mean(-1, keepdim=True) + eps)


def layer_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    opmath: torch.dtype | None = None,
) -> Tensor:
    """LayerNorm over the last dim computed in float64, returned in float64."""
    xd = x.to(torch.float64)
    mean, rstd = layer_norm_stats(xd, eps, opmath)
    y = (xd - mean) * rstd
    if weight is not None:
        y = y * weight.to(torch.float64)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y


def layer_norm_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    eps: float,
    opmath: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias) of :func:`layer_norm` in float64, written out:
    dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)), dw = sum g*xhat, db = sum g."""
    xd, gd = x.to(torch.float64), grad_out.to(torch.float64)
    mean, rstd = layer_norm_stats(xd, eps, opmath)
    xhat = (xd - mean) * rstd
    gw = gd * weight.to(torch.float64) if weight is not None else gd
    dx = rstd * (gw - gw.mean(-1, keepdim=True) - xhat * (gw * xhat).mean(-1, keepdim=True))
    rows = lambda t: t.flatten(0, -2) if t.dim() > 1 else t.unsqueeze(0)  # noqa: E731
    return dx, rows(gd * xhat).sum(0), rows(gd).sum(0)


# --- Attention -----------------------------------------------------------------------------------


def attention_visibility(lq: int, lk: int, is_causal: bool, left: int, right: int) -> Tensor:
    """[Lq, Lk] bool: which keys each query sees before the mask. is_causal: F.sdpa's top-left
    diagonal (j <= i); windows: flash-attn's bottom-right alignment,
    i + Lk - Lq - left <= j <= i + Lk - Lq + right (-1: unbounded on that side)."""
    i = torch.arange(lq).unsqueeze(1)
    j = torch.arange(lk).unsqueeze(0)
    vis = torch.ones(lq, lk, dtype=torch.bool)
    if is_causal:
        vis &= j <= i
    if left >= 0:
        vis &= j >= i + (lk - lq) - left
    if right >= 0:
        vis &= j <= i + (lk - lq) + right
    return vis


def _attention_scores(q, k, mask, scale, is_causal, left, right):
    """float64 scaled scores [B, Hq, Lq, Lk] (K repeated per query head) with the mask applied,
    -inf where a key is not visible; and that visibility."""
    q, k = q.double(), k.double()
    g = q.shape[1] // k.shape[1] if k.shape[1] else 1
    kr = k.repeat_interleave(g, dim=1)
    if scale is None:
        scale = 1.0 / q.shape[-1] ** 0.5 if q.shape[-1] else 1.0
    s = torch.matmul(q, kr.transpose(-1, -2)) * scale
    vis = attention_visibility(q.shape[2], k.shape[2], is_causal, left, right).expand(s.shape)
    if mask is not None:
        if mask.dtype == torch.bool:
            vis = vis & mask
        else:
            s = s + mask.double()
    s = torch.where(vis, s, torch.full_like(s, float("-inf")))
    return s, vis, scale, g


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
) -> tuple[Tensor, Tensor]:
    """metalcore.attention's reference in float64: (out, lse), plain softmax over the full score
    matrix. A row that sees no key gets out 0 and lse +inf (flash-attn's convention)."""
    s, _, _, g = _attention_scores(q, k, mask, scale, is_causal, window_left, window_right)
    lse = torch.logsumexp(s, dim=-1)
    empty = lse == float("-inf")
    p = torch.exp(s - torch.where(empty, 0.0, lse).unsqueeze(-1))
    out = torch.matmul(p, v.double().repeat_interleave(g, dim=1))
    out = torch.where(empty.unsqueeze(-1), 0.0, out)
    return out, torch.where(empty, float("inf"), lse)


def attention_backward(
    grad_out: Tensor,
    grad_lse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor | None,
    scale: float | None,
    is_causal: bool,
    window_left: int,
    window_right: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """metalcore.attention_backward's reference in float64, from the given out and lse:
    P = exp(S - lse) (0 where not visible), D = rowsum(dO * out) - grad_lse,
    dS = P (dO V^T - D), dq = scale dS K, dk = scale dS^T q, dv = P^T dO, with the gradients of
    the query heads of each KV head summed (GQA)."""
    s, vis, scale, g = _attention_scores(q, k, mask, scale, is_causal, window_left, window_right)
    p = torch.where(vis, torch.exp(s - lse.double().unsqueeze(-1)), 0.0)
    do = grad_out.double()
    delta = (do * out.double()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.double()
    vr = v.double().repeat_interleave(g, dim=1)
    kr = k.double().repeat_interleave(g, dim=1)
    ds = p * (torch.matmul(do, vr.transpose(-1, -2)) - delta.unsqueeze(-1))
    dq = torch.matmul(ds, kr) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.double()) * scale
    dv = torch.matmul(p.transpose(-1, -2), do)
    b, hkv, lk = k.shape[0], k.shape[1], k.shape[2]
    dk = dk.reshape(b, hkv, g, lk, k.shape[3]).sum(2)
    dv = dv.reshape(b, hkv, g, lk, v.shape[3]).sum(2)
    return dq, dk, dv


# --- Softmax -----------------------------------------------------------------------------------


def softmax(x: Tensor, dim: int) -> Tensor:
    """Softmax in float64 written out (exp(x - max) / sum), returned in x's dtype."""
    xd = x.to(torch.float64)
    if xd.numel() == 0:
        return x.clone()
    if xd.dim() == 0:
        xd = xd.reshape(1)
    e = torch.exp(xd - xd.amax(dim, keepdim=True))
    return (e / e.sum(dim, keepdim=True)).reshape(x.shape).to(x.dtype)


def log_softmax(x: Tensor, dim: int) -> Tensor:
    """log_softmax in float64 written out ((x - max) - log(sum(exp(x - max)))), in x's dtype."""
    xd = x.to(torch.float64)
    if xd.numel() == 0:
        return x.clone()
    if xd.dim() == 0:
        xd = xd.reshape(1)
    shifted = xd - xd.amax(dim, keepdim=True)
    out = shifted - torch.log(torch.exp(shifted).sum(dim, keepdim=True))
    return out.reshape(x.shape).to(x.dtype)


def softmax_backward(grad_out: Tensor, output: Tensor, dim: int) -> Tensor:
    """y * (g - sum(g * y)) in float64, in the output's dtype."""
    g, y = grad_out.to(torch.float64), output.to(torch.float64)
    if y.dim() == 0:
        g, y = g.reshape(1), y.reshape(1)
    out = y * (g - (g * y).sum(dim, keepdim=True))
    return out.reshape(output.shape).to(output.dtype)


def log_softmax_backward(
    grad_out: Tensor, output: Tensor, dim: int, opmath: torch.dtype = torch.float64
) -> Tensor:
    """g - exp(y) * sum(g) in float64, in the output's dtype. exp(y) is zero where it underflows
    in ``opmath`` (the math a kernel computes in): with an infinite sum(g) that decides between
    NaN (0 * inf, as every float32 kernel and PyTorch's own give) and an infinity."""
    g, y = grad_out.to(torch.float64), output.to(torch.float64)
    if y.dim() == 0:
        g, y = g.reshape(1), y.reshape(1)
    e = torch.exp(y)
    e = torch.where(e.to(opmath) == 0, torch.zeros_like(e), e)
    out = g - e * g.sum(dim, keepdim=True)
    return out.reshape(output.shape).to(output.dtype)


# --- Cross-entropy -----------------------------------------------------------------------------


def cross_entropy(
    x: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy over class indices written out in float64 (log-sum-exp, the target's
    logit, label smoothing as torch defines it), returned in x's dtype."""
    xd = x.to(torch.float64)
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    logp = log_softmax(xd, 1) if xd.shape[0] else xd
    nll = -logp.gather(1, safe.unsqueeze(1)).squeeze(1) if xd.shape[0] else xd.sum(1)
    loss = (1.0 - label_smoothing) * nll
    if label_smoothing > 0:
        loss = loss + label_smoothing * -logp.mean(1)
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.to(x.dtype)
    total = loss.sum()
    if reduction == "mean":
        total = total / keep.sum()
    return total.to(x.dtype)


def cross_entropy_backward(
    grad_loss: Tensor,
    x: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """d loss / d x in float64: scale (softmax - (1 - eps) onehot - eps / C), 0 for ignored
    rows, in x's dtype."""
    xd = x.to(torch.float64)
    n, c = xd.shape
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    p = softmax(xd, 1) if n else xd
    onehot = torch.nn.functional.one_hot(safe, c).to(torch.float64) if n else xd
    g = p - (1.0 - label_smoothing) * onehot - label_smoothing / c
    scale = grad_loss.to(torch.float64).expand(n)
    if reduction == "mean":
        scale = scale / keep.sum()
    g = torch.where(keep.unsqueeze(1), g * scale.unsqueeze(1), torch.zeros_like(g))
    return g.to(x.dtype)


def fused_linear_cross_entropy(
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """cross_entropy(x @ weight.T + bias) with the logits materialized, in float64."""
    logits = x.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    return cross_entropy(logits, target, ignore_index, reduction, label_smoothing).to(x.dtype)


def fused_linear_cross_entropy_backward(
    grad_loss: Tensor,
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias) in float64 through the materialized logits:
    G = d loss / d logits, then G @ weight, G^T @ x, sum(G); grad_bias is empty without bias."""
    xd, wd = x.double(), weight.double()
    logits = xd @ wd.T
    if bias is not None:
        logits = logits + bias.double()
    g = cross_entropy_backward(
        grad_loss.double(), logits, target, ignore_index, reduction, label_smoothing
    )
    gb = g.sum(0) if bias is not None else xd.new_empty(0)
    return g @ wd, g.T @ xd, gb


# --- embedding_bag -------------------------------------------------------------------------------


def embedding_bag(
    weight: Tensor,
    indices: Tensor,
    offsets: Tensor,
    mode: str = "mean",
    per_sample_weights: Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> Tensor:
    """torch.nn.functional.embedding_bag in float64 (PyTorch's own op: the user-facing semantics
    metalcore.embedding_bag follows)."""
    psw = None if per_sample_weights is None else per_sample_weights.double()
    return torch.nn.functional.embedding_bag(
        indices.long(),
        weight.double(),
        offsets.long(),
        mode=mode,
        per_sample_weights=psw,
        include_last_offset=include_last_offset,
        padding_idx=padding_idx,
    )


def embedding_bag_backward(
    grad_out: Tensor,
    weight: Tensor,
    indices: Tensor,
    offsets: Tensor,
    mode: str = "mean",
    per_sample_weights: Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(grad_weight, grad_per_sample_weights) in float64 through torch's autograd of
    F.embedding_bag; the second is empty without per_sample_weights."""
    w = weight.double().detach().requires_grad_()
    psw = None
    if per_sample_weights is not None:
        psw = per_sample_weights.double().detach().requires_grad_()
    out = embedding_bag(w, indices, offsets, mode, psw, include_last_offset, padding_idx)
    leaves = [w] + ([psw] if psw is not None else [])
    grads = torch.autograd.grad(out, leaves, grad_out.double(), allow_unused=True)
    gw = grads[0] if grads[0] is not None else torch.zeros_like(w)
    if psw is None:
        return gw, w.new_empty(0)
    gp = grads[1] if grads[1] is not None else torch.zeros_like(psw)
    return gw, gp


# --- LoRA linear ---------------------------------------------------------------------------------


def lora_linear(
    x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float, bias=None
) -> Tensor:
    """F.linear(x, W, bias) + scaling * (x @ A^T) @ B^T in float64 (PEFT's LoRA Linear)."""
    xd = x.double()
    out = torch.nn.functional.linear(xd, weight.double(), None if bias is None else bias.double())
    return out + scaling * (xd @ lora_a.double().T) @ lora_b.double().T


def lora_linear_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    bias=None,
    weight_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_lora_a, grad_lora_b, grad_bias) in float64 through torch's
    autograd of :func:`lora_linear`; grad_weight empty unless ``weight_grad``, grad_bias empty
    without bias."""
    leaves = [t.double().detach().requires_grad_() for t in (x, weight, lora_a, lora_b)]
    b = None if bias is None else bias.double().detach().requires_grad_()
    out = lora_linear(*leaves, scaling, b)
    wanted = leaves + ([b] if b is not None else [])
    grads = torch.autograd.grad(out, wanted, grad_out.double(), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wanted)]
    gx, gw, ga, gb = grads[:4]
    empty = gx.new_empty(0)
    return gx, gw if weight_grad else empty, ga, gb, grads[4] if b is not None else empty


# --- Linear algebra, second slice: QR, LU, solve ----------------------------------------------


def qr(A: Tensor, mode: str = "reduced") -> tuple[Tensor, Tensor]:
    """float64 LAPACK QR; a matrix with a non-finite entry gets Q and R's upper triangle NaN
    (R's strict lower triangle is structurally zero)."""
    A = A.double()
    ok = _finite_matrices(A)
    Q, R = torch.linalg.qr(torch.where(ok[..., None, None], A, 0.0), mode)
    nan = float("nan")
    upper = torch.ones(R.shape[-2:], dtype=torch.bool).triu()
    R = torch.where(ok[..., None, None] & upper, R, torch.where(upper, nan, R))
    if mode != "r":
        Q = torch.where(ok[..., None, None], Q, nan)
    return Q, R


def lu_factor_ex(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """float64 LAPACK getrf; a matrix with a non-finite entry gets an all-NaN LU, pivots
    1..k and info 0 (metalcore's rule: LAPACK's pivoting around NaN is not defined)."""
    A = A.double()
    ok = _finite_matrices(A)
    LU, piv, info = torch.linalg.lu_factor_ex(torch.where(ok[..., None, None], A, 0.0))
    k = piv.shape[-1]
    LU = torch.where(ok[..., None, None], LU, float("nan"))
    ident = torch.arange(1, k + 1, dtype=torch.int32).expand_as(piv)
    piv = torch.where(ok[..., None], piv, ident)
    info = torch.where(ok, info, 0)
    return LU, piv, info


def lu_solve(
    LU: Tensor, pivots: Tensor, B: Tensor, left: bool = True, adjoint: bool = False
) -> Tensor:
    return torch.linalg.lu_solve(LU.double(), pivots, B.double(), left=left, adjoint=adjoint)


def solve_ex(A: Tensor, B: Tensor, left: bool = True) -> tuple[Tensor, Tensor]:
    """float64 LAPACK gesv; the solution of an exactly singular matrix (info > 0) or of one
    with a non-finite entry (whose LU is all NaN) is all NaN."""
    A = A.double()
    ok = _finite_matrices(A)
    if B.dim() == A.dim() - 1:
        # The op reads B as matrices; torch.linalg would read a B of shape A.shape[:-1] as a
        # batch of vectors. A leading 1 keeps the broadcast batch and forces the matrix reading.
        B = B.unsqueeze(0)
    X, info = torch.linalg.solve_ex(torch.where(ok[..., None, None], A, 1.0), B.double(), left=left)
    info = torch.where(ok, info, 0)
    bad = (info != 0) | ~ok
    return X.masked_fill(bad[..., None, None], float("nan")), info
