"""Schedule and memory fuzzing of every kernel family through the launch layer: reversed and
random lane orders, random threadgroup order, and msim's uninitialised-threadgroup-memory check.
A kernel that depends on an execution order Metal does not guarantee fails here."""

from __future__ import annotations

import pytest
import torch

from . import test_activation, test_adamw, test_rmsnorm, test_rope


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_family(msim_backend, mops, schedule, max_threads, dtype):
    max_threads(64)  # several simdgroups per threadgroup and every variant at small sizes
    msim = msim_backend
    for n in (150, 300):  # single and looped at 64 threads
        test_rmsnorm.check(msim, "fused_add_rmsnorm", 9, n, dtype, "offset", True)
        test_rmsnorm.check(msim, "fused_add_rmsnorm_backward", 17, n, dtype, "sliced", True, True)
    test_activation.check(msim, "swiglu", (3, 333), dtype, "offset")
    test_activation.check(msim, "swiglu_backward", (3, 333), dtype, "offset")
    test_activation.check(msim, "gelu", (1025,), dtype, "contiguous")
    test_activation.check(msim, "gelu_backward", (1025,), dtype, "contiguous")
    test_rope.check(msim, 2, 5, 2, 3, 18, 12, dtype, "3d", "transposed", True, fp32_tables=True)
    # AdamW has no threadgroup memory, and the uninitialised-memory check reruns a dispatch,
    # which cannot restore tensors it updates in place through metadata pointers.
    mops.set_option("uninit_check", "0")
    specs = [(n, dtype, torch.float32) for n in (0, 5, 4097)] * 30
    test_adamw.check(msim, specs, amsgrad=True, maximize=False)
