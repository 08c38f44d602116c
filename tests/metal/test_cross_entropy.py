"""cross_entropy kernels through the Metal launch layer on msim: every kernel (direction, dtype)
once with ignored rows and label smoothing, and a pipeline limited below the row length. The op
contract (numerics, edge cases, bad inputs) runs on msim from tests/ops/test_contract.py and
tests/reliability/test_fuzz.py."""

from __future__ import annotations

import pytest
import torch

from metalcore.testing import backends as bk
from metalcore.testing.op_specs import SPECS, Sample, TensorArg
from tests.support import seeded

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check(msim, op, n, c, dtype, reduction="mean", smoothing=0.1, seed=0):
    x = seeded(n, c, dtype=dtype, seed=seed, scale=3.0)
    t = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))
    t[::3] = -100
    args = [TensorArg(x), TensorArg(t), -100, reduction, smoothing]
    if op == "cross_entropy_backward":
        g = seeded(*((n,) if reduction == "none" else ()), dtype=dtype, seed=seed + 1)
        args = [TensorArg(g), *args]
    bk.check_sample(SPECS[op], msim, Sample(args, dtype=dtype))


@pytest.mark.parametrize("op", ["cross_entropy", "cross_entropy_backward"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_kernel(msim_backend, op, dtype):
    check(msim_backend, op, 5, 1029, dtype)
    check(msim_backend, op, 4, 33, dtype, reduction="none", smoothing=0.0)


@pytest.mark.parametrize("limit", [32, 64])
def test_small_threadgroup_limit(msim_backend, max_threads, limit):
    max_threads(limit)
    check(msim_backend, "cross_entropy", 3, 500, torch.float32)
    check(msim_backend, "cross_entropy_backward", 3, 500, torch.bfloat16, reduction="sum")
