"""The Metal kernels on a real Apple GPU: the op contract (the tests of tests/ops/test_contract.py
and the fuzzer's numerics, collected here with the ``device`` fixture fixed to mps) plus the
kernel variants the real pipeline limit selects, large AdamW lists and a training step across
ops. Skipped off-Mac; ``METALCORE_REQUIRE_MPS=1`` (the macOS CI job) turns the skip into a
failure."""

from __future__ import annotations

import os

import pytest
import torch

import metalcore
from metalcore.testing import backends as bk
from metalcore.testing.op_specs import SPECS
from tests.metal.test_adamw import DTYPE_PAIRS, adamw_sample
from tests.metal.test_float64 import check_rejects_float64
from tests.metal.test_rmsnorm import rms_case
from tests.ops.test_contract import (  # noqa: F401  (the op contract, collected here for mps)
    exported,
    test_bad_input,
    test_compile,
    test_edge_cases,
    test_export,
    test_gradients,
    test_opcheck,
)
from tests.reliability.test_fuzz import test_matches_float64_reference  # noqa: F401
from tests.support import seeded

MPS = bk.backend("mps")
WHY = MPS.unavailable()
if WHY and os.environ.get("METALCORE_REQUIRE_MPS") == "1":
    raise RuntimeError(f"METALCORE_REQUIRE_MPS=1 but metalcore {WHY}")
pytestmark = pytest.mark.skipif(WHY is not None, reason=WHY or "")

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="session")
def device() -> bk.Backend:
    """The op contract's device, here only the Apple GPU."""
    return MPS


# The real pipeline limit decides the variant here: cover both sides of the 4096 cutoff.
@pytest.mark.parametrize("n", [4095, 4096, 4097, 4100, 8191, 8192, 16384 + 3])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rmsnorm_variant_cutoffs(n, dtype):
    for layout in ("offset", "contiguous"):  # scalar and (for n % 4 == 0) vec4 kernels
        for op, rows, extra in (
            ("fused_add_rmsnorm", 3, {}),
            ("fused_add_rmsnorm_backward", 9, {"grad_res": True}),
        ):
            bk.check_sample(SPECS[op], MPS, rms_case(op, rows, n, dtype, layout, True, **extra))


@pytest.mark.parametrize("op", sorted(SPECS))
def test_metal_rejects_float64(op):
    missing = MPS.op_unavailable(op)
    if missing:
        pytest.skip(missing)  # a family without Metal kernels yet
    check_rejects_float64(MPS, op)


@pytest.mark.parametrize("pair", DTYPE_PAIRS)
def test_adamw_large_tensors(pair):
    sizes = [0, 1, 7, 4096, 4097, 1 << 20]
    sample = adamw_sample([(n, *pair) for n in sizes], amsgrad=True, maximize=False)
    bk.check_sample(SPECS["adamw"], MPS, sample)


def test_adamw_more_tensors_than_one_launch():
    specs = [(n % 50 + (n == 3) * 4096, torch.float32, torch.float32) for n in range(150)]
    bk.check_sample(SPECS["adamw"], MPS, adamw_sample(specs, amsgrad=True, maximize=False))


def test_training_step_on_mps():
    # Autograd routes the backward ops to the MPS kernels across a small block; gradients match
    # the CPU's.
    x, w = seeded(4, 16, 96, seed=1), seeded(96, seed=2)
    grads = []
    for device in ("cpu", "mps"):
        leaves = [t.to(device).requires_grad_() for t in (x, w)]
        y, h = metalcore.fused_add_rmsnorm(leaves[0], leaves[0] * 2, leaves[1])
        out = metalcore.swiglu(metalcore.rmsnorm(y, leaves[1]), metalcore.gelu(h, "tanh"))
        out.sum().backward()
        grads.append([t.grad.cpu() for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
