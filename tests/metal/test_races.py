"""Race mode: every kernel that uses threadgroup memory runs through the launch layer under
ThreadSanitizer (msim's race build), and TSan must report nothing."""

from __future__ import annotations

from .conftest import run_race_child

# Kernels with threadgroup memory (two-level reductions): all in kernels/rmsnorm.metal.
RACE_KERNELS = [
    f"rmsnorm_{variant}{width}"
    for variant in ("single", "looped", "bwd_single", "bwd_looped")
    for width in ("", "_vec4")
]


def test_threadgroup_kernels_are_race_free(mops):
    dispatched = run_race_child("-m", "tests.metal.race_child")
    for kernel in RACE_KERNELS:
        for dtype in ("float32", "float16", "bfloat16"):
            assert f"{kernel}_{dtype}" in dispatched
