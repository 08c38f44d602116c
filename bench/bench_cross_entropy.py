"""cross_entropy (logits [N, V]) and fused_linear_cross_entropy (hidden [N, H], LM head [V, H]):
metalcore vs eager torch and torch.compile of F.cross_entropy / F.linear + F.cross_entropy.
Byte models: cross_entropy forward reads the logits once, backward reads them and writes their
gradient; the fused op is compute-bound (its rows report no bandwidth)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import metalcore
from metalcore.testing import bench as h


def shapes(device: str, quick: bool):
    if device == "cuda":
        return (8192, 128256, 4096) if not quick else (4096, 32000, 2048)
    if device == "mps":
        return (4096, 32000, 2048)
    return (1024, 32000, 512) if not quick else (256, 32000, 256)


def run(suite: h.Suite) -> None:
    dev = suite.device
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    es = torch.finfo(dtype).bits // 8
    n, v, hidden = shapes(dev, suite.quick)
    nv = n * v

    def make_logits():
        x = torch.randn(n, v, device=dev, dtype=dtype, requires_grad=True)
        return x, torch.randint(0, v, (n,), device=dev)

    def plain_ce(x, t):
        return F.cross_entropy(x, t)

    for name, fn in (
        ("metalcore", metalcore.cross_entropy),
        ("eager", plain_ce),
        ("compile", h.compiled(plain_ce)),
    ):
        h.timed_directions(
            suite,
            "cross_entropy",
            f"{n}x{v}",
            name,
            dtype,
            make_logits,
            fn,
            nv * es,
            2 * nv * es,
            nv * es,
        )

    def make_head():
        x = torch.randn(n, hidden, device=dev, dtype=dtype, requires_grad=True)
        w = (torch.randn(v, hidden, device=dev, dtype=dtype) * hidden**-0.5).requires_grad_()
        return x, w, torch.randint(0, v, (n,), device=dev)

    def plain_flce(x, w, t):
        return F.cross_entropy(F.linear(x, w), t)

    for name, fn in (
        ("metalcore", metalcore.fused_linear_cross_entropy),
        ("eager", plain_flce),
        ("compile", h.compiled(plain_flce)),
    ):
        h.timed_directions(
            suite,
            "fused_linear_cross_entropy",
            f"{n}x{v}x{hidden}",
            name,
            dtype,
            make_head,
            fn,
            0,
            0,
            (n + v) * hidden * es,
            ("fwd+bwd",),
        )
