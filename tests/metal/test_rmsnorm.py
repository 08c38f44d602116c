"""rmsnorm / fused_add_rmsnorm kernel variants through the Metal launch layer on msim: the
register-resident, looped and vec4 variants at and across their cutoffs, and the backward's row
blocking. The op contract (numerics, edge cases, bad inputs) runs on msim from
tests/ops/test_contract.py and tests/reliability/test_fuzz.py; these pin the sizes it would
reach only by chance."""

from __future__ import annotations

import pytest
import torch

from metalcore.testing import backends as bk
from metalcore.testing.op_specs import SPECS, pinned

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rms_case(op, rows, n, dtype, layout, weight, grad_res=False, seed=0):
    """One spec-drawn sample of ``op`` with ``rows`` x ``n`` inputs in ``layout`` ("offset":
    seven elements in, so never 16-byte aligned and never a vec4 kernel; "sliced": every other
    element of each row)."""
    pins = dict(dtype=dtype, large_rows=False, lead_ndim=1, lead0=rows, n=n, has_weight=weight)
    pins["has_grad_residual_out"] = grad_res
    pins["weight.layout"] = "contiguous"
    for name in ("input", "res", "g", "h", "grad_res"):
        pins[f"{name}.layout"] = layout
        pins[f"{name}.offset"] = 7
        pins[f"{name}.dim"], pins[f"{name}.step"] = 1, 2  # sliced: every other element of a row
    return pinned(op, seed, **pins)


def check(msim, op, *args, **kwargs):
    bk.check_sample(SPECS[op], msim, rms_case(op, *args, **kwargs))


# (threadgroup limit, row length): the register-resident variants hold 4 * limit elements, so
# each pair sits exactly at a cutoff and just across it (by one element, and by one vec4: the
# contiguous layouts of multiples of 4 take the _vec4 kernels, the offset ones never do).
CUTOFFS = [(1024, 4096), (1024, 4097), (128, 512), (128, 513), (128, 516), (32, 128), (32, 132)]


@pytest.mark.parametrize("limit,n", CUTOFFS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_variant_cutoffs(msim_backend, max_threads, limit, n, dtype):
    max_threads(limit)
    check(msim_backend, "rmsnorm", 2, n, dtype, "offset", True)
    check(msim_backend, "fused_add_rmsnorm", 2, n, dtype, "contiguous", False)
    check(msim_backend, "fused_add_rmsnorm_backward", 3, n, dtype, "offset", True, grad_res=True)
    check(msim_backend, "rmsnorm_backward", 3, n, dtype, "contiguous", False)


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 41, 4103])
def test_backward_row_blocking(msim_backend, max_threads, rows):
    # Rows per threadgroup and the 512-group cap (4103 rows) of the dweight partials.
    max_threads(32)
    check(msim_backend, "rmsnorm_backward", rows, 5, torch.float32, "contiguous", True)
    check(
        msim_backend,
        "fused_add_rmsnorm_backward",
        rows,
        200,
        torch.float32,
        "contiguous",
        True,
        True,
    )
