"""silu, gelu and swiglu: metalcore vs eager, torch.compile of the plain formulation and (swiglu)
Liger-Kernel. Byte models: silu/gelu fwd 2, bwd 3 passes; swiglu fwd 3, bwd 5 passes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import metalcore
from metalcore.testing import bench as h


def shape(device: str, quick: bool):
    if device == "cuda":
        return (16384, 14336) if not quick else (8192, 8192)
    if device == "mps":
        return (4096, 8192)
    return (512, 2048)


def run(suite: h.Suite) -> None:
    dev = suite.device
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    es = torch.finfo(dtype).bits // 8
    m, n = shape(dev, suite.quick)
    case = f"{m}x{n}"
    mn = m * n

    def make_pair():
        a = torch.randn(m, n, device=dev, dtype=dtype, requires_grad=True)
        b = torch.randn(m, n, device=dev, dtype=dtype, requires_grad=True)
        return a, b

    def plain_swiglu(a, b):
        return F.silu(a) * b

    sw = {
        "metalcore": metalcore.swiglu,
        "eager": plain_swiglu,
        "compile": h.compiled(plain_swiglu),
    }
    lk = h.try_liger() if dev == "cuda" else None
    if lk is not None:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        sw["liger"] = lambda a, b: LigerSiLUMulFunction.apply(a, b)
    for name, fn in sw.items():
        h.timed_directions(
            suite, "swiglu", case, name, dtype, make_pair, fn, 3 * mn * es, 5 * mn * es, 3 * mn * es
        )

    def make_one():
        return (torch.randn(m, n, device=dev, dtype=dtype, requires_grad=True),)

    dirs = ("fwd", "bwd") if not suite.quick else ("fwd",)
    for op, mc, plain in (
        ("silu", metalcore.silu, F.silu),
        ("gelu", metalcore.gelu, F.gelu),
        ("gelu_tanh", lambda x: metalcore.gelu(x, "tanh"), lambda x: F.gelu(x, approximate="tanh")),
    ):
        for name, fn in (("metalcore", mc), ("eager", plain), ("compile", h.compiled(plain))):
            h.timed_directions(
                suite,
                op,
                case,
                name,
                dtype,
                make_one,
                fn,
                2 * mn * es,
                3 * mn * es,
                2 * mn * es,
                dirs,
            )

    a = torch.randn(1, 128, device=dev)
    suite.host("swiglu", "metalcore", lambda: torch.ops.metalcore.swiglu(a, a), a)
