"""Metal has no float64: every op rejects a float64 sample of its spec with the Metal backend's
own TypeError (naming the op and the argument) before the shared checks, on msim here and on an
Apple GPU in tests/mps."""

from __future__ import annotations

import pytest
import torch

from metalcore.testing import backends as bk
from metalcore.testing.op_specs import SPECS, pinned


def check_rejects_float64(backend: bk.Backend, op: str) -> None:
    dtype_label = "param_dtype" if op == "adamw" else "dtype"
    # The affine dequantize ops return their scales' dtype: those are float64 too.
    pins = {dtype_label: torch.float64, "n_params": 1, "scales.dtype": torch.float64}
    sample = pinned(op, 0, **pins)
    args, kwargs = sample.materialize(backend.device)
    match = rf"metalcore\.{op}: '\w+(\[0\])?' must be float16, bfloat16 or float32 on the Metal"
    with pytest.raises(TypeError, match=match):
        backend.call(SPECS[op], args, kwargs)


@pytest.mark.parametrize("op", sorted(SPECS))
def test_metal_rejects_float64(msim_backend, op):
    missing = msim_backend.op_unavailable(op)
    if missing:
        pytest.skip(missing)  # a family without Metal kernels yet (the status table says which)
    check_rejects_float64(msim_backend, op)
