"""softmax / log_softmax kernels through the Metal launch layer on msim: every kernel (variant,
dtype) once, rows longer than a threadgroup, and a pipeline limited below the row length. The
op contract (numerics, edge cases, bad inputs) runs on msim from tests/ops/test_contract.py and
tests/reliability/test_fuzz.py."""

from __future__ import annotations

import pytest
import torch

from metalcore.testing import backends as bk
from metalcore.testing import reference as ref
from metalcore.testing.op_specs import SPECS, Sample, TensorArg
from tests.support import seeded

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check(msim, op, shape, dim, dtype, seed=0):
    x = seeded(*shape, dtype=dtype, seed=seed, scale=3.0)
    if op.endswith("_backward"):
        fwd = ref.log_softmax if op.startswith("log") else ref.softmax
        y = fwd(x.double(), dim).to(dtype)
        g = seeded(*shape, dtype=dtype, seed=seed + 1)
        sample = Sample([TensorArg(g), TensorArg(y), dim], dtype=dtype)
    else:
        sample = Sample([TensorArg(x), dim], dtype=dtype)
    bk.check_sample(SPECS[op], msim, sample)


@pytest.mark.parametrize(
    "op", ["softmax", "log_softmax", "softmax_backward", "log_softmax_backward"]
)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_kernel(msim_backend, op, dtype):
    check(msim_backend, op, (3, 1029), -1, dtype)  # rows: one threadgroup per row
    check(msim_backend, op, (2, 7, 5), 1, dtype)  # columns: one thread per (outer, inner)


@pytest.mark.parametrize("limit", [32, 64])
def test_small_threadgroup_limit(msim_backend, max_threads, limit):
    # Rows longer than the threadgroup: each thread strides over several elements.
    max_threads(limit)
    check(msim_backend, "softmax", (2, 777), 1, torch.float32)
    check(msim_backend, "log_softmax_backward", (2, 300), -1, torch.float16)
