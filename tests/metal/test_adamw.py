"""The fused AdamW step through the Metal launch layer on msim, in the cases the spec's draws do
not make: chunk tails around the 4096-element chunk of one threadgroup, mixed dtype groups in
one call, more tensors than one launch holds, dense non-contiguous tensors, a small pipeline
limit, and the Metal backend's own rejection of float64 steps. The op contract
(numerics, edge cases, bad inputs) runs on msim from tests/ops/test_contract.py and
tests/reliability/test_fuzz.py."""

from __future__ import annotations

import pytest
import torch

from metalcore.testing import backends as bk
from metalcore.testing.op_specs import SPECS, Sample, TensorArg
from tests.support import seeded

# (param dtype, state dtype) pairs the kernels are instantiated for.
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]
HYPER = [0.9, 0.99, 0.05, 1e-8]  # beta1, beta2, weight_decay, eps


def adamw_sample(specs, amsgrad, maximize, transposed=False, seed=0) -> Sample:
    """specs: (numel, param dtype, state dtype[, transposed]) per tensor; ``transposed`` for all
    whose numel is a multiple of 3. Moments of realistic magnitude, steps 0, 1, 2 in turn
    (three bias corrections)."""
    lists = {k: [] for k in ("p", "g", "m", "v", "mx", "steps")}
    for i, (numel, pt, sd, *own) in enumerate(specs):
        flip = own[0] if own else transposed
        shape = (numel // 3, 3) if flip and numel % 3 == 0 and numel else (numel,)
        # Dense but not contiguous: every list of one parameter in the same memory order.
        layout, dims = ("transposed", (0, 1)) if len(shape) == 2 else ("contiguous", ())

        def arg(dtype, scale=1.0, positive=False, k=0, shape=shape, i=i, lay=(layout, dims)):
            x = seeded(*shape, dtype=torch.float64, seed=seed + 10 * i + k, scale=scale)
            return TensorArg((x.abs() if positive else x).to(dtype), *lay)

        lists["p"].append(arg(pt, k=1))
        lists["g"].append(arg(pt, k=2))
        lists["m"].append(arg(sd, 0.1, k=3))
        lists["v"].append(arg(sd, 0.01, positive=True, k=4))
        if amsgrad:
            lists["mx"].append(arg(sd, 0.01, positive=True, k=5))
        lists["steps"].append(TensorArg(torch.tensor(float(i % 3))))
    lr = TensorArg(torch.tensor(1e-2, dtype=torch.float64))
    args = [*(lists[k] for k in ("p", "g", "m", "v", "mx", "steps")), lr, *HYPER]
    return Sample(args + [amsgrad, maximize], dtype=specs[0][1] if specs else torch.float32)


def check(msim, specs, amsgrad, maximize, transposed=False):
    bk.check_sample(SPECS["adamw"], msim, adamw_sample(specs, amsgrad, maximize, transposed))


# Element counts around the 4096-element chunk of one threadgroup, and tiny/empty tensors.
SIZES = [0, 1, 7, 255, 4095, 4096, 4097, 9000]


@pytest.mark.parametrize("pair", DTYPE_PAIRS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_chunk_tails(msim_backend, pair, amsgrad):
    check(msim_backend, [(n, *pair) for n in SIZES], amsgrad, maximize=not amsgrad)


@pytest.mark.parametrize("pair", DTYPE_PAIRS)
def test_every_kernel_with_mixed_groups(msim_backend, pair):
    # Two dtype groups in one call: one launch pair each.
    specs = [(4097, *pair), (33, torch.float32, torch.float32), (0, *pair), (5000, *pair)]
    check(msim_backend, specs, amsgrad=True, maximize=False)


def test_more_tensors_than_one_launch(msim_backend):
    specs = [(n % 50 + (n == 3) * 4096, torch.float32, torch.float32) for n in range(150)]
    check(msim_backend, specs, amsgrad=False, maximize=True)


def test_dense_strided_tensors(msim_backend):
    specs = [(3 * 1500, torch.float32, torch.float32), (6, torch.bfloat16, torch.float32)]
    check(msim_backend, specs, amsgrad=True, maximize=False, transposed=True)


@pytest.mark.parametrize("limit", [32, 64])
def test_small_threadgroup_limit(msim_backend, max_threads, limit):
    max_threads(limit)
    check(msim_backend, [(4097, torch.float32, torch.float32)], False, False)


def test_metal_rejects_float64_steps(mops):
    # The kernels read float32 step counters: the Metal backend's own error (float64 params:
    # test_float64.py).
    s = adamw_sample([(8, torch.float32, torch.float32)], False, False)
    args, _ = s.materialize("cpu")
    args[5] = [torch.tensor(0.0, dtype=torch.float64)]
    with pytest.raises(TypeError, match=r"'state_steps\[0\]' must be float32 on the Metal"):
        mops.adamw(*args)
