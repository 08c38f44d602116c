"""Runs each metalcore CUDA kernel once at the benchmark shapes, for a profiler to inspect:

    ncu --section SpeedOfLight --section Occupancy --section LaunchStats \\
        -k regex:"rmsnorm|rope|adamw|eltwise" python bench/profile_kernels.py
"""

import torch

import metalcore

ops = torch.ops.metalcore
dev, bf = "cuda", torch.bfloat16
for m, n in ((16384, 4096), (8192, 8192)):
    x = torch.randn(m, n, device=dev, dtype=bf)
    w = torch.randn(n, device=dev, dtype=bf)
    ops.rmsnorm(x, w, 1e-6)
    ops.rmsnorm_backward(torch.randn_like(x), x, w, 1e-6)
del x
q = torch.randn(4, 4096, 32, 128, device=dev, dtype=bf).transpose(1, 2)
k = torch.randn(4, 8, 4096, 128, device=dev, dtype=bf)
cos = torch.randn(1, 4096, 128, device=dev, dtype=bf)
ops.rope(q, k, cos, cos, False)
ops.rope_backward(q.contiguous(), k, cos, cos, False)
del q, k
ps = [torch.randn(4 << 20, device=dev) for _ in range(64)]
metalcore.adamw_step(
    ps,
    ps,
    [p.clone() for p in ps],
    [p.abs() for p in ps],
    [torch.zeros((), device=dev) for _ in range(64)],
    lr=torch.tensor(1e-4, device=dev),
)
torch.cuda.synchronize()
