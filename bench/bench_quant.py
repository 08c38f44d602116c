"""Weight-only quantized linear: metalcore's int4_linear (affine, g128) and gguf_linear (Q4_0,
Q8_0) against the bf16 dense F.linear, dequantize-then-matmul in eager and under torch.compile,
and PyTorch's own CPU int4 path (``_weight_int4pack_mm_for_cpu``, bf16 only).

Bytes are what the kernel must read: the packed weight (+ scales and biases) and the
activations; at M = 1 that is the memory-bound cost the formats exist to cut. The weights are
reused across repetitions, so sizes that fit the last-level cache read from it. Metal numbers
are never measured here: ``predicted_metal_us`` gives the bytes / bandwidth prediction.

Run alone: ``python bench/bench_quant.py [--quick]`` (CPU), or through ``bench/run.py --ops quant``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metalcore import quant
from metalcore.testing import bench as h

GROUP = 128


def shapes(device: str, quick: bool):
    """(N, K, Ms): weights [N, K] = [out_features, in_features]."""
    if quick:
        return [(14336, 4096, (1, 16))]
    return [(14336, 4096, (1, 4, 16, 64)), (4096, 14336, (1, 16))]


def predicted_metal_us(nbytes: int, bandwidth_gbps: float, efficiency: float = 0.8) -> float:
    """A Metal prediction, never a measurement: bytes over efficiency * spec bandwidth."""
    return nbytes / (efficiency * bandwidth_gbps * 1e9) * 1e6


def _int4pack(w: torch.Tensor, group: int):
    """PyTorch's CPU int4 operands (tinygemm parameters: w = (q - 8) * s + z)."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / 15).clamp_min(1e-6)
    q = ((g - lo.unsqueeze(-1)) / s.unsqueeze(-1)).round().clamp(0, 15).to(torch.int32)
    z = lo + 8 * s
    packed = torch._convert_weight_to_int4pack_for_cpu(q.reshape(n, k), 1)
    sz = torch.stack([s, z], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, sz


def _affine_eager(x, q, s, b, group):
    """Dequantize-then-matmul in plain torch ops (the baseline a user would write)."""
    n = q.shape[0]
    codes = torch.stack([q & 15, q >> 4], -1).reshape(n, -1).to(x.dtype)
    w = codes.view(n, -1, group) * s.to(x.dtype).unsqueeze(-1) + b.to(x.dtype).unsqueeze(-1)
    return F.linear(x, w.reshape(n, -1))


def _providers(x: torch.Tensor, t: dict, compiled) -> dict:
    """name -> (call, bytes it must read) for activations x and the weights in t."""
    xb = x.numel() * x.element_size()
    q, s, b = t["int4"]
    int4_bytes = q.numel() + 2 * s.numel() * s.element_size()
    dense = t["dense"].to(x.dtype)
    out = {
        "metalcore-int4": (lambda: quant.int4_linear(x, q, s, b, GROUP), int4_bytes + xb),
        "metalcore-Q4_0": (lambda: quant.gguf_linear(x, t["Q4_0"], 2), t["Q4_0"].numel() + xb),
        "metalcore-Q8_0": (lambda: quant.gguf_linear(x, t["Q8_0"], 8), t["Q8_0"].numel() + xb),
        "eager-deq+mm": (lambda: _affine_eager(x, q, s, b, GROUP), int4_bytes + xb),
        "compile-deq+mm": (lambda: compiled(x, q, s, b, GROUP), int4_bytes + xb),
        "dense-F.linear": (lambda: F.linear(x, dense), dense.numel() * dense.element_size() + xb),
    }
    if x.dtype == torch.bfloat16:
        packed, sz = t["int4pack"]
        out["torch-int4pack"] = (
            lambda: torch._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz),
            int4_bytes + xb,
        )
    return out


def run(suite: h.Suite) -> None:
    dev = suite.device
    if dev != "cpu":
        suite.log("  quant: only the CPU kernels exist; nothing to measure on " + dev)
        return
    compiled = h.compiled(_affine_eager)
    for n, k, ms in shapes(dev, suite.quick):
        w = torch.randn(n, k) * 0.02
        tensors = {
            "int4": quant.quantize_int4(w, GROUP, dtype=torch.bfloat16),
            "Q4_0": quant.quantize_gguf(w, "Q4_0"),
            "Q8_0": quant.quantize_gguf(w, "Q8_0"),
            "dense": w,
            "int4pack": _int4pack(w, GROUP),
        }
        for m in ms:
            for dtype in (torch.bfloat16, torch.float32):
                x = torch.randn(m, k, dtype=dtype)
                case = f"{n}x{k} M={m} {str(dtype).replace('torch.', '')}"
                for name, (fn, nbytes) in _providers(x, tensors, compiled).items():
                    suite.measure("quant", case, "fwd", name, dtype, fn, nbytes)
    # Metal: predictions only (bytes / (0.8 * spec bandwidth)), labelled as such.
    for chip, bw in (("M1 68 GB/s", 68), ("M3 Max 400 GB/s", 400)):
        nbytes = 14336 * 4096 // 2 + 2 * 2 * 14336 * 4096 // 64
        suite.log(
            f"  quant PREDICTED Metal int4 g64 4096x14336 M=1 on {chip}: "
            f"{predicted_metal_us(nbytes, bw):.0f} us (bytes / 0.8 bandwidth, not measured)"
        )


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    run(h.Suite("cpu", args.quick))
