"""Eager per-call overhead of metalcore ops on a 1-element CPU tensor vs the nearest aten ops.

python bench/overhead_cpu.py  (one intra-op thread; medians of 15 x 2000 calls)
"""

import statistics
import time

import torch
import torch.nn.functional as F

import metalcore

torch.set_num_threads(1)
x = torch.randn(1)
w = torch.randn(1)
xg = torch.randn(1, requires_grad=True)
ops = torch.ops.metalcore
cases = {
    "aten silu": lambda: F.silu(x),
    "aten silu (torch.ops...default)": lambda: torch.ops.aten.silu.default(x),
    "mc silu (torch.ops...default)": lambda: ops.silu.default(x),
    "mc silu (functional)": lambda: metalcore.silu(x),
    "aten rms_norm": lambda: F.rms_norm(x, (1,), w, 1e-6),
    "mc rmsnorm": lambda: ops.rmsnorm.default(x, w, 1e-6),
    "aten silu grad": lambda: F.silu(xg),
    "mc silu grad": lambda: ops.silu.default(xg),
}
res = {k: [] for k in cases}
for _rep in range(15):
    for k, f in cases.items():
        for _ in range(200):
            f()
        t = time.perf_counter()
        for _ in range(2000):
            f()
        res[k].append((time.perf_counter() - t) / 2000 * 1e6)
for k, v in res.items():
    print(f"{k:34s} {statistics.median(v):6.2f} us")
