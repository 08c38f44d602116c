"""embedding_bag (sum, mean, max): metalcore vs F.embedding_bag (eager) and torch.compile of the
same call. Byte model: forward reads the N gathered rows and writes [B, D]; backward reads
grad_out once per index (N rows) and writes the dense [V, D] weight gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import metalcore
from metalcore.testing import bench as h


def shapes(device: str, quick: bool):
    """(num_embeddings V, dim D, bags B, indices per bag L) per device."""
    if device == "cpu":
        # A recommender's table slice: 2048 bags of 20 lookups into 100K rows of 64.
        return [(100_000, 64, 2048, 20)] + ([] if quick else [(20_000, 256, 1024, 50)])
    return [(1_000_000, 128, 16384, 40)]


def _eager(mode):
    return lambda idx, w, off: F.embedding_bag(idx, w, off, mode=mode)


def providers(mode: str):
    return {
        "metalcore": lambda idx, w, off: metalcore.embedding_bag(idx, w, off, mode=mode),
        "eager": _eager(mode),
        "compile": h.compiled(_eager(mode)),
    }


def run(suite: h.Suite) -> None:
    dev = suite.device
    for dtype in (torch.float32,) if dev == "cpu" else (torch.bfloat16,):
        es = torch.finfo(dtype).bits // 8
        for v, d, b, length in shapes(dev, suite.quick):
            n = b * length
            case = f"V{v}xD{d} B{b}xL{length}"

            def make(v=v, d=d, b=b, n=n, length=length, dtype=dtype):
                g = torch.Generator().manual_seed(0)
                idx = torch.randint(0, v, (n,), generator=g).to(dev)
                off = torch.arange(0, n, length, device=dev)
                w = torch.randn(v, d, generator=g).to(dev, dtype).requires_grad_()
                return idx, w, off

            for mode in ("sum", "mean", "max"):
                for name, fn in providers(mode).items():
                    h.timed_directions(
                        suite,
                        f"embedding_bag_{mode}",
                        case,
                        name,
                        dtype,
                        make,
                        fn,
                        (n + b) * d * es,
                        (n + v) * d * es,
                        v * d * es,
                        ("fwd", "fwd+bwd"),
                    )
