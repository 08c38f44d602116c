"""rope (Hugging Face layout, GQA): metalcore vs HF apply_rotary_pos_emb eager, torch.compile of
it, and Liger-Kernel. Byte model: 2 * (q + k) per direction (cos/sin are L2-resident)."""

from __future__ import annotations

import torch

import metalcore
from metalcore._dispatch import has_kernel
from metalcore.testing import bench as h

ops = torch.ops.metalcore


def hf_rope(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb with rotate_half (cos/sin [B or 1, S, D])."""

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def shape(device: str, quick: bool):
    if device == "cuda":
        return (4, 32, 8, 4096, 128) if not quick else (2, 32, 8, 2048, 128)
    if device == "mps":
        return (2, 32, 8, 2048, 128)
    return (1, 8, 2, 256, 64)


def run(suite: h.Suite) -> None:
    dev = suite.device
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    es = torch.finfo(dtype).bits // 8
    b, hq, hk, s, d = shape(dev, suite.quick)
    case = f"B{b} Hq{hq} Hk{hk} S{s} D{d}"
    qk = b * (hq + hk) * s * d
    ang = torch.rand(1, s, d // 2, device=dev) * 6.28
    cos = torch.cat((ang.cos(), ang.cos()), -1).to(dtype)
    sin = torch.cat((ang.sin(), ang.sin()), -1).to(dtype)

    def make():
        # HF produces q/k as transposed views of [B, S, H, D] projections.
        q = torch.randn(b, s, hq, d, device=dev, dtype=dtype).transpose(1, 2).requires_grad_()
        k = torch.randn(b, s, hk, d, device=dev, dtype=dtype).transpose(1, 2).requires_grad_()
        return q, k, cos, sin

    def make_contiguous():
        # Backward timings use contiguous leaves: a transposed leaf would add a layout-restoring
        # copy in AccumulateGrad to every provider's time.
        q = torch.randn(b, hq, s, d, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(b, hk, s, d, device=dev, dtype=dtype, requires_grad=True)
        return q, k, cos, sin

    provs = {"eager": hf_rope, "compile": h.compiled(hf_rope)}
    if has_kernel("rope", dev):
        provs = {"metalcore": lambda q, k, c, s_: metalcore.rope(q, k, c, s_), **provs}
    else:
        print(f"  rope: no metalcore kernel for {dev} in this build")
    if (h.try_liger() if dev == "cuda" else None) is not None:
        from liger_kernel.ops.rope import LigerRopeFunction

        provs["liger"] = lambda q, k, c, s_: LigerRopeFunction.apply(q, k, c, s_)
    for name, fn in provs.items():

        def both(q, k, c, s_, fn=fn):
            qo, ko = fn(q, k, c, s_)
            return (_Join.apply(qo, ko),)

        h.timed_directions(
            suite,
            "rope",
            case,
            name,
            dtype,
            make,
            both,
            2 * qk * es,
            2 * qk * es,
            2 * qk * es,
            ("fwd",),
            note="q/k transposed views",
        )
        h.timed_directions(
            suite,
            "rope",
            case,
            name,
            dtype,
            make_contiguous,
            both,
            2 * qk * es,
            2 * qk * es,
            2 * qk * es,
            ("bwd", "fwd+bwd"),
            note="contiguous q/k leaves",
        )

    q = torch.randn(1, 2, 4, 16, device=dev)
    c1 = torch.randn(4, 16, device=dev)
    if has_kernel("rope", dev):
        suite.host("rope", "metalcore", lambda: ops.rope(q, q, c1, c1, False), q)


class _Join(torch.autograd.Function):
    """Returns q_out as the value to backpropagate while routing a matching random gradient to
    k_out, so backward() drives both outputs without an extra reduction kernel per direction."""

    @staticmethod
    def forward(ctx, qo, ko):
        ctx.k_shape = ko.shape
        ctx.k_meta = (ko.dtype, ko.device)
        return qo.view_as(qo)

    @staticmethod
    def backward(ctx, gq):
        dtype, device = ctx.k_meta
        gk = _GK.get(ctx.k_shape, dtype, device)
        return gq, gk


class _GK:
    cache: dict = {}

    @classmethod
    def get(cls, shape, dtype, device):
        key = (tuple(shape), dtype, str(device))
        if key not in cls.cache:
            cls.cache[key] = torch.randn(*shape, dtype=dtype, device=device)
        return cls.cache[key]
