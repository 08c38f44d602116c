"""rope / rope_backward kernels through the Metal launch layer on msim: every kernel (pairing,
dtype, table dtype) once, and a pipeline limited below 256 threads. The op contract (numerics,
edge cases, bad inputs) runs on msim from tests/ops/test_contract.py and
tests/reliability/test_fuzz.py."""

from __future__ import annotations

import pytest
import torch

from metalcore.testing import backends as bk
from metalcore.testing.op_specs import SPECS, pinned

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check(msim, b, hq, hk, s, d, rot, dtype, table, layout, interleaved, fp32_tables=False):
    pins = dict(batch=b, q_heads=hq, k_heads=hk, long_seq=False, seq=s, head_dim=d, rot=rot)
    pins.update(dtype=dtype, fp32_tables=fp32_tables, table_form=table, interleaved=interleaved)
    for name in ("q", "k", "grad_q_out", "grad_k_out"):
        pins[f"{name}.layout"] = layout
        # transposed: heads and seq swapped, as Hugging Face's projections lay q and k out
        pins[f"{name}.dim_a"], pins[f"{name}.dim_b"] = 1, 2
        pins[f"{name}.offset"] = 7
    for name in ("cos", "sin"):
        pins[f"{name}.layout"] = "contiguous"
    for op in ("rope", "rope_backward"):
        bk.check_sample(SPECS[op], msim, pinned(op, 0, **pins))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("fp32_tables", [False, True])
def test_every_kernel(msim_backend, interleaved, dtype, fp32_tables):
    check(msim_backend, 2, 5, 2, 3, 18, 12, dtype, "3d", "transposed", interleaved, fp32_tables)


@pytest.mark.parametrize("limit", [32, 64])
def test_small_threadgroup_limit(msim_backend, max_threads, limit):
    max_threads(limit)
    check(msim_backend, 1, 4, 1, 7, 80, 64, torch.float32, "2d", "offset", False)
