"""The fused AdamW step through the Metal launch layer and kernels (msim on CPU tensors), against
the CPU kernel and the float64 reference: several steps (bias corrections), chunk tails, more
tensors than one launch holds, mixed dtype groups, amsgrad, maximize, dense strided tensors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from metalcore.testing import reference as ref

# (param dtype, state dtype) pairs the kernels are instantiated for.
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]
# Element counts around the 4096-element chunk of one threadgroup, and tiny/empty tensors.
SIZES = [0, 1, 7, 255, 4095, 4096, 4097, 9000]
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def make_state(specs, amsgrad, device, transposed=False):
    """specs: (numel, param dtype, state dtype) per tensor; returns the op's lists."""
    gen = torch.Generator().manual_seed(len(specs))
    lists = {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max", "steps")}
    for numel, pt, st_ in specs:
        shape = (numel // 3, 3) if transposed and numel % 3 == 0 and numel else (numel,)

        def t(dtype, scale=1.0, positive=False, shape=shape):
            x = torch.randn(shape, generator=gen) * scale
            x = x.abs() if positive else x
            if len(shape) == 2:  # dense but not contiguous: every list in the same order
                x = x.t().contiguous().t()
            return x.to(dtype).to(device)

        lists["params"].append(t(pt))
        lists["grads"].append(t(pt))
        lists["exp_avgs"].append(t(st_, 0.1))
        lists["exp_avg_sqs"].append(t(st_, 0.01, positive=True))
        if amsgrad:
            lists["max"].append(t(st_, 0.01, positive=True))
        lists["steps"].append(torch.tensor(float(len(lists["steps"]) % 3), device=device))
    return lists


def clone(lists, device="cpu"):
    return {k: [t.detach().clone().to(device) for t in v] for k, v in lists.items()}


HP = dict(beta1=0.9, beta2=0.99, weight_decay=0.05, eps=1e-8)


def run(ops, s, lr, amsgrad, maximize):
    ops.adamw(
        s["params"], s["grads"], s["exp_avgs"], s["exp_avg_sqs"], s["max"], s["steps"],
        lr, HP["beta1"], HP["beta2"], HP["weight_decay"], HP["eps"], amsgrad, maximize,
    )  # fmt: skip


def check_adamw(ops, device, specs, amsgrad, maximize, steps=3, transposed=False):
    state = make_state(specs, amsgrad, device, transposed)
    on_cpu = clone(state)
    reference = clone(state)
    lr = torch.tensor(1e-2, dtype=torch.float64)
    for i in range(steps):
        # On a GPU, alternate a device lr (read by the kernel) and a CPU lr (read on the host).
        lr_dev = lr.to(torch.float32).to(device) if device != "cpu" and i % 2 == 0 else lr
        run(ops, state, lr_dev, amsgrad, maximize)
        run(torch.ops.metalcore, on_cpu, lr, amsgrad, maximize)
        ref.adamw_step_reference(
            reference["params"], reference["grads"], reference["exp_avgs"],
            reference["exp_avg_sqs"], reference["max"], reference["steps"],
            lr=1e-2, amsgrad=amsgrad, maximize=maximize, **HP,
        )  # fmt: skip
    for key in state:
        for got, cpu_t, want in zip(state[key], on_cpu[key], reference[key]):
            tol = TOL[got.dtype] * 4
            torch.testing.assert_close(got.cpu(), cpu_t, rtol=tol, atol=tol)
            torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)


@given(
    sizes=st.lists(st.sampled_from(SIZES), min_size=1, max_size=5),
    pair=st.sampled_from(DTYPE_PAIRS),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
)
def test_matches_cpu_and_reference(mops, sizes, pair, amsgrad, maximize):
    check_adamw(mops, "cpu", [(n, *pair) for n in sizes], amsgrad, maximize)


@pytest.mark.parametrize("pair", DTYPE_PAIRS)
def test_every_kernel_with_mixed_groups(mops, pair):
    # Two dtype groups in one call: one launch pair each.
    specs = [(4097, *pair), (33, torch.float32, torch.float32), (0, *pair), (5000, *pair)]
    check_adamw(mops, "cpu", specs, amsgrad=True, maximize=False)


def test_more_tensors_than_one_launch(mops):
    specs = [(n % 50 + (n == 3) * 4096, torch.float32, torch.float32) for n in range(150)]
    check_adamw(mops, "cpu", specs, amsgrad=False, maximize=True, steps=2)


def test_dense_strided_tensors(mops):
    specs = [(3 * 1500, torch.float32, torch.float32), (6, torch.bfloat16, torch.float32)]
    check_adamw(mops, "cpu", specs, amsgrad=True, maximize=False, transposed=True)


@pytest.mark.parametrize("limit", [32, 64])
def test_small_threadgroup_limit(mops, max_threads, limit):
    max_threads(limit)
    check_adamw(mops, "cpu", [(4097, torch.float32, torch.float32)], False, False, steps=1)


def test_empty_lists_and_bad_inputs(mops):
    run(mops, {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max", "steps")},
        torch.tensor(1e-3), False, False)  # fmt: skip
    s = make_state([(8, torch.float64, torch.float64)], False, "cpu")
    with pytest.raises(TypeError, match=r"metalcore\.adamw: 'params\[0\]' must be float16, bf"):
        run(mops, s, torch.tensor(1e-3), False, False)
    s = make_state([(8, torch.float32, torch.float32)], False, "cpu")
    s["steps"] = [torch.tensor(0.0, dtype=torch.float64)]
    with pytest.raises(TypeError, match=r"'state_steps\[0\]' must be float32 on the Metal"):
        run(mops, s, torch.tensor(1e-3), False, False)
