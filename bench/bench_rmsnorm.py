"""rmsnorm and fused_add_rmsnorm: metalcore vs F.rms_norm (eager), torch.compile of the HF
formulation, and Liger-Kernel. Byte models as in the peer table: rmsnorm fwd 2, bwd 3 passes over
[M, N]; fused add fwd 4, fwd+bwd 9."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import metalcore
from metalcore.testing import bench as h
from metalcore.testing import reference as ref

EPS = 1e-6


def shapes(device: str, quick: bool):
    """(M, N, directions, with fused_add_rmsnorm) per device."""
    all3 = ("fwd", "bwd", "fwd+bwd")
    if device == "cuda":
        full = [(16384, 4096, all3, True), (8192, 8192, all3, True)]
        if quick:
            return full
        small = [(m, 4096, ("fwd+bwd",), False) for m in (1024, 2048, 4096)]
        # Rows too wide to keep in registers (the streaming kernels).
        wide = [(2048, 65536, all3, False)]
        return full + small + wide
    if device == "mps":
        return [(4096, 4096, all3, True)]
    return [(256, 1024, all3, True)] + ([] if quick else [(2048, 4096, ("fwd+bwd",), False)])


def providers_rmsnorm(device: str):
    hf_compiled = h.compiled(ref.hf_llama_rmsnorm)
    out = {
        "metalcore": lambda x, w: metalcore.rmsnorm(x, w, EPS),
        "eager": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS),
        "compile": lambda x, w: hf_compiled(x, w, EPS),
    }
    lk = h.try_liger() if device == "cuda" else None
    if lk is not None:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        out["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, EPS)
    return out


def providers_fused_add(device: str):
    def unfused_hf(x, r, w):
        s = x + r
        return ref.hf_llama_rmsnorm(s, w, EPS), s

    c = h.compiled(unfused_hf)
    out = {
        "metalcore": lambda x, r, w: metalcore.fused_add_rmsnorm(x, r, w, EPS),
        "eager": lambda x, r, w: (F.rms_norm(x + r, (x.shape[-1],), w, EPS),),
        "compile": c,
    }
    lk = h.try_liger() if device == "cuda" else None
    if lk is not None:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

        out["liger"] = lambda x, r, w: LigerFusedAddRMSNormFunction.apply(x, r, w, EPS)
    return out


def run(suite: h.Suite) -> None:
    dev = suite.device
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    es = torch.finfo(dtype).bits // 8
    for m, n, dirs, with_add in shapes(dev, suite.quick):
        case = f"{m}x{n}"

        def make(m=m, n=n):
            x = torch.randn(m, n, device=dev, dtype=dtype, requires_grad=True)
            w = (1 + 0.1 * torch.randn(n, device=dev, dtype=dtype)).requires_grad_()
            return x, w

        for name, fn in providers_rmsnorm(dev).items():
            h.timed_directions(
                suite,
                "rmsnorm",
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

        def make_add(m=m, n=n):
            x = torch.randn(m, n, device=dev, dtype=dtype, requires_grad=True)
            r = torch.randn(m, n, device=dev, dtype=dtype, requires_grad=True)
            w = (1 + 0.1 * torch.randn(n, device=dev, dtype=dtype)).requires_grad_()
            return x, r, w

        for name, fn in providers_fused_add(dev).items():
            h.timed_directions(
                suite,
                "fused_add_rmsnorm",
                case,
                name,
                dtype,
                make_add,
                fn,
                4 * m * n * es,
                5 * m * n * es,
                3 * m * n * es,
                ("fwd", "fwd+bwd"),
            )

    # Host overhead on a tiny row (the device work is negligible).
    x = torch.randn(1, 128, device=dev)
    w = torch.randn(128, device=dev)
    suite.host("rmsnorm", "metalcore", lambda: torch.ops.metalcore.rmsnorm(x, w, EPS), x)
    suite.host("rmsnorm", "eager", lambda: F.rms_norm(x, (128,), w, EPS), x)
    xg = x.clone().requires_grad_()
    suite.host(
        "rmsnorm",
        "metalcore+autograd",
        lambda: metalcore.rmsnorm(xg, w, EPS),
        xg,
        note="requires_grad input: C++ autograd node recorded",
    )
