"""A GPU whose pipelines break the kernels' simdgroup assumptions makes the op raise, naming the
kernel, instead of computing wrong sums: msim reports the width and threadgroup limit set here,
and the shared check (check_pipeline_limits in csrc/common/encoder.h) runs when the launch layer
selects a pipeline, as the Metal backend runs it when it creates one."""

from __future__ import annotations

import re

import pytest
import torch


@pytest.fixture
def execution_width(mops):
    def set_width(n: int) -> None:
        mops.set_option("execution_width", str(n))

    yield set_width
    mops.set_option("execution_width", "32")


def _every_family(mops):
    x = torch.randn(3, 40)
    params, grads = [torch.randn(10)], [torch.randn(10)]
    states = [torch.zeros(10)], [torch.zeros(10)], [], [torch.zeros(())]
    cos, sin = torch.randn(5, 8), torch.randn(5, 8)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)
    return {
        "rmsnorm": lambda: mops.rmsnorm(x, None, 1e-6),
        "silu": lambda: mops.silu(x),
        "rope": lambda: mops.rope(q, k, cos, sin),
        "adamw": lambda: mops.adamw(
            params, grads, *states, torch.tensor(1e-3), 0.9, 0.999, 0.01, 1e-8
        ),
    }


@pytest.mark.parametrize("family", ["rmsnorm", "silu", "rope", "adamw"])
@pytest.mark.parametrize("width", [16, 64])
def test_other_simdgroup_width_raises_naming_the_kernel(mops, execution_width, family, width):
    call = _every_family(mops)[family]
    execution_width(width)
    with pytest.raises(RuntimeError) as info:
        call()
    message = str(info.value)
    kernel = re.search(r"Metal kernel '(\w+)'", message)
    assert kernel and kernel.group(1) in mops.launch_kernel_names(), message
    assert kernel.group(1).startswith(family)
    assert f"runs {width}-wide simdgroups on this GPU (threadExecutionWidth)" in message
    assert "written for 32-wide simdgroups" in message
    execution_width(32)
    call()  # the same call runs once the GPU reports 32 lanes again


def test_adamw_step_is_not_applied_when_a_later_pipeline_is_refused(mops, execution_width):
    # The check runs before anything is dispatched: a refused op leaves its tensors untouched.
    params, grads = [torch.randn(10)], [torch.randn(10)]
    before = params[0].clone()
    steps = [torch.zeros(())]
    execution_width(64)
    with pytest.raises(RuntimeError, match="threadExecutionWidth"):
        mops.adamw(
            params, grads, [torch.zeros(10)], [torch.zeros(10)], [], steps,
            torch.tensor(1e-3), 0.9, 0.999, 0.01, 1e-8,
        )  # fmt: skip
    assert torch.equal(params[0], before)
    assert steps[0].item() == 0


def test_threadgroup_limit_below_one_simdgroup_raises(mops, max_threads):
    max_threads(16)
    with pytest.raises(RuntimeError, match=r"allows only 16 threads per threadgroup .*32-wide"):
        mops.silu(torch.randn(100))
