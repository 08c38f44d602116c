"""lora_linear: metalcore vs PEFT's formulation in eager (F.linear of the base plus
F.linear(F.linear(x, A), B) * scaling) and torch.compile of it, with a frozen base weight (the
LoRA fine-tune). Byte model: forward reads x and W and writes y; backward reads grad_out, x and W
and writes grad_x (the rank-r terms are small next to these)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import metalcore
from metalcore.testing import bench as h

SCALING = 2.0


def shapes(device: str, quick: bool):
    """(tokens M, in, out, rank r) per device."""
    if device == "cpu":
        return [(2048, 1024, 1024, 16)] + ([] if quick else [(512, 4096, 4096, 64)])
    return [(8192, 4096, 4096, 16)]


def _eager(x, w, a, b, bias):
    return F.linear(x, w, bias) + F.linear(F.linear(x, a), b) * SCALING


def providers():
    return {
        "metalcore": lambda x, w, a, b, bias: metalcore.lora_linear(x, w, a, b, SCALING, bias),
        "eager": _eager,
        "compile": h.compiled(_eager),
    }


def run(suite: h.Suite) -> None:
    dev = suite.device
    for dtype in (torch.float32, torch.bfloat16) if dev == "cpu" else (torch.bfloat16,):
        es = torch.finfo(dtype).bits // 8
        for m, k, n, r in shapes(dev, suite.quick):
            case = f"{m}x{k}->{n} r{r}"

            def make(m=m, k=k, n=n, r=r, dtype=dtype):
                x = torch.randn(m, k, device=dev, dtype=dtype, requires_grad=True)
                w = torch.randn(n, k, device=dev, dtype=dtype) / k**0.5  # frozen base
                a = (torch.randn(r, k, device=dev, dtype=dtype) / k**0.5).requires_grad_()
                b = (torch.randn(n, r, device=dev, dtype=dtype) / r**0.5).requires_grad_()
                bias = torch.randn(n, device=dev, dtype=dtype)
                return x, w, a, b, bias

            for name, fn in providers().items():
                h.timed_directions(
                    suite,
                    "lora_linear",
                    case,
                    name,
                    dtype,
                    make,
                    fn,
                    (m * k + n * k + m * n) * es,
                    (m * n + m * k + n * k + m * k) * es,
                    (m * k + n * k) * es,
                    ("fwd", "fwd+bwd"),
                )
