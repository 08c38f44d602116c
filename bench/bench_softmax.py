"""softmax and log_softmax over the last dim: metalcore vs eager torch and torch.compile. Byte
models: forward 2 passes (read x, write y), backward 3 (read g and y, write dx)."""

from __future__ import annotations

import torch

import metalcore
from metalcore.testing import bench as h


def shape(device: str, quick: bool):
    if device == "cuda":
        return (32768, 4096) if not quick else (8192, 4096)
    if device == "mps":
        return (8192, 4096)
    return (1024, 4096) if not quick else (256, 4096)


def run(suite: h.Suite) -> None:
    dev = suite.device
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    es = torch.finfo(dtype).bits // 8
    m, n = shape(dev, suite.quick)
    case = f"{m}x{n}"
    mn = m * n

    def make():
        return (torch.randn(m, n, device=dev, dtype=dtype, requires_grad=True),)

    for op, mc, plain in (
        ("softmax", metalcore.softmax, torch.softmax),
        ("log_softmax", metalcore.log_softmax, torch.log_softmax),
    ):

        def eager(x, plain=plain):
            return plain(x, -1)

        def ours(x, mc=mc):
            return mc(x, -1)

        for name, fn in (("metalcore", ours), ("eager", eager), ("compile", h.compiled(eager))):
            h.timed_directions(
                suite, op, case, name, dtype, make, fn, 2 * mn * es, 3 * mn * es, mn * es
            )
