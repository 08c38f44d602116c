"""silu, gelu (erf/tanh) and swiglu kernels through the Metal launch layer on msim: every kernel
(op, dtype) once, and a pipeline limited below 256 threads. The op contract (numerics, edge
cases, bad inputs) runs on msim from tests/ops/test_contract.py and
tests/reliability/test_fuzz.py."""

from __future__ import annotations

import pytest
import torch

from metalcore.testing import backends as bk
from metalcore.testing.op_specs import SPECS, pinned

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = ["silu", "silu_backward", "gelu", "gelu_backward", "swiglu", "swiglu_backward"]


def check(msim, op, shape, dtype, layout, approximate="none", seed=0):
    pins = {
        "dtype": dtype,
        "shape.large": False,
        "shape.ndim": len(shape),
        "approximate": approximate,
    }
    pins.update({f"shape.size{i}": n for i, n in enumerate(shape)})
    for name in ("input", "grad_out", "gate", "up"):
        pins[f"{name}.layout"] = layout
        pins[f"{name}.offset"] = 7
        pins[f"{name}.dim"] = len(shape) - 1  # sliced: every step-th element of the last dim
        pins[f"{name}.scale"] = 3.0
    bk.check_sample(SPECS[op], msim, pinned(op, seed, **pins))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_kernel(msim_backend, op, dtype):
    # One deterministic pass over every (op, dtype, approximation): each host name is dispatched.
    for approximate in ("none", "tanh") if op.startswith("gelu") else ("none",):
        check(msim_backend, op, (2, 1029), dtype, "offset", approximate)


@pytest.mark.parametrize("limit", [32, 64])
def test_small_threadgroup_limit(msim_backend, max_threads, limit):
    # A pipeline limited below 256 threads: the launch layer shrinks the block and grid to match.
    max_threads(limit)
    check(msim_backend, "swiglu", (777,), torch.float32, "contiguous")
    check(msim_backend, "swiglu_backward", (777,), torch.float32, "contiguous")
    check(msim_backend, "gelu", (130,), torch.float16, "sliced")
    check(msim_backend, "gelu_backward", (130,), torch.float16, "sliced")
