"""embedding_bag kernels through the Metal launch layer on msim: every kernel (variant, dtype)
once, the backward's bookkeeping (bags, counts, the stable sort by row) with hot rows, padding and
empty bags, and the argmax routing of equal maxima. The op contract (numerics, edge cases, bad
inputs) runs on msim from tests/ops/test_contract.py and tests/reliability/test_fuzz.py."""

from __future__ import annotations

import pytest
import torch

from metalcore.testing import backends as bk
from metalcore.testing.op_specs import SPECS, Sample, TensorArg
from tests.support import seeded

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(mode, dtype, psw, seed=0):
    g = torch.Generator().manual_seed(seed)
    v, d, bags = 37, 300, 21  # 300 columns: threads past one threadgroup per bag
    lengths = torch.randint(0, 9, (bags,), generator=g)
    lengths[3] = 0
    offsets = torch.cumsum(lengths, 0) - lengths
    n = int(lengths.sum())
    indices = torch.randint(0, v, (n,), generator=g)
    indices[::4] = 5  # a hot row: many positions to sum in order
    w = seeded(v, d, dtype=dtype, seed=seed + 1)
    weights = TensorArg(seeded(n, dtype=dtype, seed=seed + 2)) if psw else None
    return w, indices, offsets, weights


@pytest.mark.parametrize(
    "mode,psw", [("sum", False), ("sum", True), ("mean", False), ("max", False)]
)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_kernel(msim_backend, mode, psw, dtype):
    w, idx, off, weights = _case(mode, dtype, psw)
    args = [TensorArg(w), TensorArg(idx), TensorArg(off), mode, weights, False, 7]
    bk.check_sample(SPECS["embedding_bag"], msim_backend, Sample(args, dtype=dtype))
    grad = TensorArg(seeded(off.numel(), w.shape[1], dtype=dtype, seed=9))
    bwd = Sample([grad, *args], dtype=dtype)
    bk.check_sample(SPECS["embedding_bag_backward"], msim_backend, bwd)


def test_backward_matches_the_cpu_kernel_bit_for_bit_in_float32(msim_backend):
    # Both sum each row's contributions in index order in float32: the same additions.
    for mode in ("sum", "mean", "max"):
        w, idx, off, _ = _case(mode, torch.float32, False, seed=3)
        g = seeded(off.numel(), w.shape[1], seed=4)
        args = [g, w, idx, off, mode, None, False, 7]
        cpu = torch.ops.metalcore.embedding_bag_backward(*args)
        msim = msim_backend.call(SPECS["embedding_bag_backward"], args, {})
        if mode == "mean":
            # The CPU multiplies by 1/count, the kernel divides: one rounding apart.
            torch.testing.assert_close(msim[0], cpu[0], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(msim[0], cpu[0]), mode
