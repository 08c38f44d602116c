"""Child process of test_races.py: runs under ThreadSanitizer (LD_PRELOAD), so it must start
fresh. Loads the race-mode kernel library and dispatches every threadgroup-memory kernel through
the launch layer with threadgroups small enough for TSan (<= 224 threads)."""

import sys

import torch

import metalcore  # noqa: F401
from tests.metal.conftest import _msim_ops_library

torch.set_num_threads(1)  # torch's own worker threads are invisible to TSan: keep them out
torch.ops.load_library(str(_msim_ops_library()))
ops = torch.ops.metalcore_msim
ops.load_kernels(sys.argv[1])

for limit in (64, 224):
    ops.set_option("max_threads", str(limit))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        # Rows that fit one threadgroup (single) and rows that do not (looped), with vec4 and
        # scalar widths; several simdgroups per threadgroup and rows per backward threadgroup.
        for n in (3 * limit, 3 * limit + 1, 4 * limit + 8, 4 * limit + 5):
            x = torch.randn(11, n, dtype=dtype)
            w = torch.randn(n, dtype=dtype)
            ops.rmsnorm(x, w, 1e-6)
            ops.fused_add_rmsnorm(x, x, w, 1e-6)
            ops.rmsnorm_backward(x, x, w, 1e-6)
            ops.fused_add_rmsnorm_backward(x, x, x, None, 1e-6)
print("dispatched:", " ".join(sorted(ops.dispatched_kernel_names())))
