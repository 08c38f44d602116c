"""Cholesky and triangular-solve kernels through the Metal launch layer on msim: both Cholesky
variants (the matrix in threadgroup memory up to order 64, in place in device memory beyond),
failing pivots per batch element, a low pipeline limit, other lane and threadgroup orders, race
mode, and the solve's column blocks and multi-lane dot products. The op contract (numerics over
drawn shapes, edge cases, bad inputs) runs on msim from tests/ops/test_contract.py and
tests/reliability/test_fuzz.py, whose drawn orders stop at 33."""

from __future__ import annotations

import pytest
import torch

from metalcore.testing import backends as bk
from metalcore.testing.op_specs import SPECS, Sample, TensorArg

from .conftest import run_race_child


def _spd(batch: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    return m @ m.mT / n + torch.eye(n, dtype=torch.float64)


def _cholesky(msim, A: torch.Tensor, upper: bool, dtype=torch.float32):
    # 16-bit inputs give float32 factors (the sample's dtype is the outputs').
    sample = Sample([TensorArg(A.to(dtype)), upper], dtype=torch.float32)
    bk.check_sample(SPECS["cholesky_ex"], msim, sample)


def _trsm(msim, n: int, k: int, upper: bool, left: bool, unit: bool, batch: int = 2, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = torch.randn(batch, n, n, generator=g, dtype=torch.float64) / (2 * n**0.5)
    A = (T.triu(1) if upper else T.tril(-1)) + torch.diag_embed(
        1 + torch.rand(batch, n, generator=g, dtype=torch.float64)
    )
    B = torch.randn(batch, *((n, k) if left else (k, n)), generator=g, dtype=torch.float64)
    args = [TensorArg(A.float()), TensorArg(B.float()), upper, left, unit]
    bk.check_sample(SPECS["solve_triangular"], msim, Sample(args, dtype=torch.float32))


@pytest.mark.parametrize("n", [1, 5, 32, 63, 64, 65, 97])  # both variants and their boundary
@pytest.mark.parametrize("upper", [False, True])
def test_cholesky_orders(msim_backend, n, upper):
    _cholesky(msim_backend, _spd(3, n, seed=n), upper)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cholesky_half_inputs_upcast(msim_backend, dtype):
    _cholesky(msim_backend, _spd(2, 9, seed=4), False, dtype)


@pytest.mark.parametrize("n", [7, 70])
def test_cholesky_failures_stay_in_their_matrix(msim_backend, n):
    # Pivots failing first, in the middle and last (negative, zero, NaN below the diagonal,
    # infinite on it) beside good matrices: each info is LAPACK's order, each failed factor NaN.
    A = _spd(7, n, seed=1)
    A[1, 0, 0] = -1.0
    A[2, n // 2, n // 2] = 0.0
    A[3, n - 1, n - 1] = -5.0
    A[4, n - 1, 0] = float("nan")
    A[5, n // 3, n // 3] = float("inf")
    A[6, 0, n - 1] = float("nan")  # strict upper triangle: never read
    _cholesky(msim_backend, A, False)
    L, info = msim_backend.call(SPECS["cholesky_ex"], [A.float(), False], {})
    assert info.tolist() == [0, 1, n // 2 + 1, n, n, n // 3 + 1, 0]
    assert L[1:6].isnan().all() and L[[0, 6]].isfinite().all()


def test_cholesky_low_pipeline_limit(msim_backend, max_threads):
    max_threads(32)  # one simdgroup: every thread loops over many entries per step
    for n in (20, 64, 66):
        _cholesky(msim_backend, _spd(2, n, seed=n + 1), False)


@pytest.mark.parametrize("n,k", [(1, 1), (5, 3), (33, 1), (40, 9), (70, 17)])
@pytest.mark.parametrize("upper", [False, True])
def test_trsm_shapes(msim_backend, n, k, upper):
    # k = 9, 17: several column blocks of 8; n > 32: each lane sums several terms of a row.
    _trsm(msim_backend, n, k, upper, left=True, unit=False, seed=n + k)


@pytest.mark.parametrize("left,unit", [(False, False), (True, True), (False, True)])
def test_trsm_right_and_unit(msim_backend, left, unit):
    for upper in (False, True):
        _trsm(msim_backend, 35, 4, upper, left, unit, seed=3)


def test_trsm_low_pipeline_limit(msim_backend, max_threads):
    max_threads(32)  # one column per threadgroup
    _trsm(msim_backend, 20, 5, False, True, False)


def test_schedules(msim_backend, schedule, max_threads):
    max_threads(64)
    for n in (9, 66):
        _cholesky(msim_backend, _spd(2, n, seed=n), False)
    _trsm(msim_backend, 37, 10, True, True, False)


RACE_CHILD = """
import sys, torch
import metalcore  # noqa: F401
from tests.metal.conftest import _msim_ops_library
torch.set_num_threads(1)
torch.ops.load_library(str(_msim_ops_library()))
ops = torch.ops.metalcore_msim
ops.load_kernels(sys.argv[1])
for limit in (64, 128):
    ops.set_option("max_threads", str(limit))
    for n in (12, 67):
        m = torch.randn(2, n, n, dtype=torch.float64)
        a = (m @ m.mT / n + torch.eye(n, dtype=torch.float64)).float()
        ops.cholesky_ex(a, False)
        a[1, n // 2, n // 2] = -1.0
        ops.cholesky_ex(a, False)
    ops.solve_triangular(torch.eye(40) * 2, torch.randn(40, 9), False, True, False)
print("dispatched:", " ".join(sorted(ops.dispatched_kernel_names())))
"""


def test_race_free(mops):
    # Cholesky shares the matrix between threads (threadgroup or device memory) step by step:
    # ThreadSanitizer must see every update ordered before its reads.
    dispatched = run_race_child("-c", RACE_CHILD)
    for variant in ("cholesky_tile", "cholesky_device", "trsm"):
        assert f"linalg_{variant}_float32" in dispatched
