"""Race mode (ThreadSanitizer with fibers): missing barriers and cross-threadgroup device races
are reported with their .metal line; correct kernels that share threadgroup memory report none."""

import numpy as np
import pytest
from msim_paths import KERNELS

from msim.race import race_check

BUGS = [KERNELS / "bugs" / "bugs.metal"]
GOOD = sorted(KERNELS.glob("*.metal"))
RNG = np.random.default_rng(1)


def bug_line(needle: str) -> int:
    lines = BUGS[0].read_text().splitlines()
    start = next(i for i, t in enumerate(lines) if "missing_barrier_bug(" in t)
    return next(i + 1 for i in range(start, len(lines)) if needle in lines[i])


def test_missing_barrier_race_is_pinned_to_its_line():
    x = np.arange(1, 9, dtype=np.float32)
    bad = race_check(
        BUGS, "missing_barrier_bug", [x, np.zeros(64, np.float32), 8], (64,), threadgroups=(1,)
    )
    assert bad.races, bad.log
    assert any(f"bugs.metal:{bug_line('acc += shared_val')}" in r for r in bad.races), bad.races
    good = race_check(
        BUGS, "missing_barrier_fixed", [x, np.zeros(64, np.float32), 8], (64,), threadgroups=(1,)
    )
    assert good.clean, good.log
    np.testing.assert_array_equal(good.outputs[1], np.arange(1, 65) * x.sum())


def test_unsynchronised_device_writes_across_threadgroups():
    bad = race_check(
        BUGS, "cross_group_race_bug", [np.zeros(1, np.float32)], (32,), threadgroups=(4,), workers=2
    )
    assert any("cross_group_race_bug" in r for r in bad.races), bad.log
    good = race_check(
        BUGS,
        "cross_group_race_fixed",
        [np.zeros(1, np.float32)],
        (32,),
        threadgroups=(4,),
        workers=2,
    )
    assert good.clean, good.log
    assert good.outputs[0][0] == sum(range(128))


@pytest.mark.parametrize(
    "name,make_args,tpg,grid",
    [
        (
            "rmsnorm_float",
            lambda: [
                RNG.standard_normal((3, 300)).astype(np.float32),
                np.ones(300, np.float32),
                np.zeros((3, 300), np.float32),
                300,
                np.float32(1e-6),
            ],
            (96,),
            {"threadgroups": (3,)},
        ),
        (
            "transpose8",
            lambda: [
                RNG.standard_normal((20, 30)).astype(np.float32),
                np.zeros((30, 20), np.float32),
                np.array([20, 30], np.uint32),
            ],
            (8, 8),
            {"threadgroups": (4, 3)},
        ),
        (
            "compact",
            lambda: [
                RNG.standard_normal(200).astype(np.float32),
                np.zeros(200, np.float32),
                np.zeros(1, np.uint32),
                200,
            ],
            (64,),
            {"threads": (200,)},
        ),
        (
            "histogram",
            lambda: [RNG.integers(0, 99, 200).astype(np.uint32), np.zeros(16, np.uint32), 200],
            (64,),
            {"threads": (200,)},
        ),
    ],
)
def test_threadgroup_memory_kernels_are_race_free(name, make_args, tpg, grid):
    report = race_check(GOOD, name, make_args(), tpg, workers=2, **grid)
    assert report.clean, report.log
