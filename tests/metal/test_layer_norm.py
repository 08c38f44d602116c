"""layer_norm / fused_add_layer_norm through the Metal launch layer on msim: rows longer than a
threadgroup (the strided loops), row lengths that end inside a simdgroup, the weight / bias /
residual flags, and the backward's row blocking with its 512-group cap. The op contract
(numerics, edge cases, bad inputs) runs on msim from tests/ops/test_contract.py and
tests/reliability/test_fuzz.py; these pin the sizes it would reach only by chance."""

from __future__ import annotations

import pytest
import torch

from metalcore.testing import backends as bk
from metalcore.testing.op_specs import SPECS, pinned

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def ln_case(op, rows, n, dtype, layout, weight, bias, grad_res=False, seed=0):
    """One spec-drawn sample of ``op`` with ``rows`` x ``n`` inputs in ``layout``."""
    pins = dict(dtype=dtype, large_rows=False, lead_ndim=1, lead0=rows, n=n)
    pins.update(has_weight=weight, has_bias=bias, has_grad_residual_out=grad_res)
    pins["weight.layout"] = pins["bias.layout"] = "contiguous"
    for name in ("input", "res", "g", "h", "grad_res"):
        pins[f"{name}.layout"] = layout
        pins[f"{name}.offset"] = 7
        pins[f"{name}.dim"], pins[f"{name}.step"] = 1, 2  # sliced: every other element of a row
    return pinned(op, seed, **pins)


def check(msim, op, *args, **kwargs):
    bk.check_sample(SPECS[op], msim, ln_case(op, *args, **kwargs))


# (threadgroup limit, row length): rows within one pass of the threads, ending mid-simdgroup,
# and several times longer than the threadgroup.
SIZES = [(32, 5), (32, 32), (32, 33), (64, 200), (128, 1031)]


@pytest.mark.parametrize("limit,n", SIZES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_threadgroup_loops(msim_backend, max_threads, limit, n, dtype):
    max_threads(limit)
    check(msim_backend, "layer_norm", 2, n, dtype, "offset", True, True)
    check(msim_backend, "fused_add_layer_norm", 2, n, dtype, "sliced", False, True)
    check(msim_backend, "layer_norm_backward", 3, n, dtype, "contiguous", True, False)
    check(msim_backend, "fused_add_layer_norm_backward", 3, n, dtype, "offset", True, True, True)


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 41, 4103])
def test_backward_row_blocking(msim_backend, max_threads, rows):
    # Rows per threadgroup and the 512-group cap (4103 rows) of the dweight / dbias partials.
    max_threads(32)
    check(msim_backend, "layer_norm_backward", rows, 5, torch.float32, "contiguous", True, True)
    check(
        msim_backend,
        "fused_add_layer_norm_backward",
        rows,
        40,
        torch.float32,
        "contiguous",
        False,
        True,
        True,
    )
