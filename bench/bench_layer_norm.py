"""layer_norm and fused_add_layer_norm: metalcore vs F.layer_norm (eager) and torch.compile of
the same call (and Liger-Kernel's LayerNorm on CUDA). Byte models: layer_norm fwd 2 passes over
[M, N] (read x, write y), bwd 3 (read x and grad, write dx); fused add fwd 4, bwd 3."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import metalcore
from metalcore.testing import bench as h

EPS = 1e-5


def shapes(device: str, quick: bool):
    """(M, N, directions, with fused_add_layer_norm) per device."""
    all3 = ("fwd", "bwd", "fwd+bwd")
    if device == "cuda":
        return [(16384, 4096, all3, True), (8192, 8192, all3, True)]
    if device == "mps":
        return [(4096, 4096, all3, True)]
    # GPT-2 small rows (768) and a wider model's (4096).
    return [(1024, 768, all3, True)] + ([] if quick else [(2048, 4096, all3, False)])


def _eager(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, EPS)


def providers(device: str):
    compiled = h.compiled(_eager)
    out = {
        "metalcore": lambda x, w, b: metalcore.layer_norm(x, x.shape[-1], w, b, EPS),
        "eager": _eager,
        "compile": compiled,
    }
    lk = h.try_liger() if device == "cuda" else None
    if lk is not None:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        out["liger"] = lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, EPS)
    return out


def _unfused(x, r, w, b):
    s = x + r
    return F.layer_norm(s, (s.shape[-1],), w, b, EPS), s


def providers_fused_add():
    return {
        "metalcore": lambda x, r, w, b: metalcore.fused_add_layer_norm(
            x, r, x.shape[-1], w, b, EPS
        ),
        "eager": _unfused,
        "compile": h.compiled(_unfused),
    }


def run(suite: h.Suite) -> None:
    dev = suite.device
    for dtype in (torch.float32, torch.bfloat16) if dev == "cpu" else (torch.bfloat16,):
        es = torch.finfo(dtype).bits // 8
        for m, n, dirs, with_add in shapes(dev, suite.quick):
            case = f"{m}x{n}"

            def make(m=m, n=n, dtype=dtype):
                x = torch.randn(m, n, device=dev, dtype=dtype, requires_grad=True)
                w = (1 + 0.1 * torch.randn(n, device=dev, dtype=dtype)).requires_grad_()
                b = (0.1 * torch.randn(n, device=dev, dtype=dtype)).requires_grad_()
                return x, w, b

            for name, fn in providers(dev).items():
                h.timed_directions(
                    suite,
                    "layer_norm",
                    case,
                    name,
                    dtype,
                    make,
                    fn,
                    2 * m * n * es,
                    3 * m * n * es,
                    2 * m * n * es,
                    dirs,
                )
            if not with_add:
                continue

            def make_add(m=m, n=n, dtype=dtype):
                x = torch.randn(m, n, device=dev, dtype=dtype, requires_grad=True)
                r = torch.randn(m, n, device=dev, dtype=dtype, requires_grad=True)
                w = (1 + 0.1 * torch.randn(n, device=dev, dtype=dtype)).requires_grad_()
                b = (0.1 * torch.randn(n, device=dev, dtype=dtype)).requires_grad_()
                return x, r, w, b

            for name, fn in providers_fused_add().items():
                h.timed_directions(
                    suite,
                    "fused_add_layer_norm",
                    case,
                    name,
                    dtype,
                    make_add,
                    fn,
                    4 * m * n * es,
                    3 * m * n * es,
                    3 * m * n * es,
                    ("fwd", "fwd+bwd"),
                )
