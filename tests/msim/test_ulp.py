"""ulp mode: math functions with an accuracy bound in the MSL specification return a result
anywhere within it (deterministically per seed and input), so tests can prove their tolerances
hold on any conforming GPU, not only against a correctly rounded libm."""

import numpy as np
import pytest
from msim_paths import KERNELS

import msim

N = 2000
X = np.concatenate([np.linspace(-8, 8, N - 4), [0.0, -1e-8, 20.0, -20.0]]).astype(np.float32)


def _exact(x):
    """float64 values and the ulp bound per column (the MSL spec's: precise and fast math)."""
    v = x.astype(np.float64)
    p = _positive(x)
    fast_exp = 3 + np.floor(np.abs(2 * x.astype(np.float32)))
    cols = [
        (np.exp(v), fast_exp),
        (np.exp(v), np.full(N, 4.0)),
        (np.exp(v), fast_exp),
        (np.log(p), np.full(N, 3.0)),  # fast log: absolute error in [0.5, 2] (checked apart)
        (np.log(p), np.full(N, 4.0)),
        (np.log2(p), np.full(N, 4.0)),
        (np.tanh(v), np.full(N, 5.0)),
        (np.tanh(v), np.full(N, 5.0)),
        (p**1.5, np.full(N, 16.0)),
        (1 / np.sqrt(p), np.full(N, 2.0)),
        (np.sin(v), np.full(N, 4.0)),
    ]
    return cols


def _positive(x):
    """The kernel's `fabs(v) + 0.25f`, rounded to float as the kernel does."""
    return (np.abs(x) + np.float32(0.25)).astype(np.float32).astype(np.float64)


def _ulp(a):
    a = np.abs(a).astype(np.float32)
    return (np.nextafter(a, np.float32(np.inf)) - a).astype(np.float64)


def _run(lib, **options):
    y = np.zeros((N, 12), np.float32)
    lib.dispatch("bounded_math", [X, y, np.uint32(N)], (64,), threads=(N,), **options)
    return y


@pytest.fixture(scope="module")
def ulp_lib():
    return msim.load([KERNELS / "ulp.metal"])


def test_off_is_correctly_rounded(ulp_lib):
    y = _run(ulp_lib)
    for k, (exact, _) in enumerate(_exact(X)):
        # double, then rounded once: equal to float32(exact) but for rare double roundings
        assert (y[:, k] == exact.astype(np.float32)).mean() > 0.999, k
        assert (np.abs(y[:, k] - exact) <= 0.5001 * _ulp(exact)).all(), k


@pytest.mark.parametrize("mode", ["random", "up", "down"])
def test_results_stay_within_the_specified_bound(ulp_lib, mode):
    y = _run(ulp_lib, ulp=mode, seed=3)
    off = _run(ulp_lib)
    p = _positive(X)
    for k, (exact, bound) in enumerate(_exact(X)):
        err = np.abs(y[:, k].astype(np.float64) - exact)
        allowed = bound * _ulp(exact)
        if k == 3:  # fast log: 2^-21 absolute for arguments in [0.5, 2]
            allowed = np.where((p >= 0.5) & (p <= 2), 2.0**-21, allowed)
        finite = np.isfinite(exact) & (np.abs(exact) < 3e38)
        assert (err[finite] <= allowed[finite] * (1 + 1e-12)).all(), k
        moved = (y[:, k] != off[:, k])[finite].mean()
        assert moved > 0.5, (k, moved)  # most results really leave the correctly rounded value
    if mode != "random":
        sign = 1 if mode == "up" else -1
        exact = np.exp(X.astype(np.float64))
        assert (np.sign(y[:, 1] - exact) == sign)[exact < 3e38].all()


def test_random_mode_is_a_function_of_seed_and_input(ulp_lib):
    a = _run(ulp_lib, ulp="random", seed=11)
    b = _run(ulp_lib, ulp="random", seed=11, lane_order="reverse", workers=1)
    c = _run(ulp_lib, ulp="random", seed=12)
    np.testing.assert_array_equal(a, b)  # the same in every thread, order and run
    assert (a != c).mean() > 0.5
    # Equal inputs give equal results wherever they occur (as a real implementation does).
    twice = np.concatenate([X[:100], X[:100]])
    y = np.zeros((200, 12), np.float32)
    ulp_lib.dispatch(
        "bounded_math", [twice, y, np.uint32(200)], (32,), threads=(200,), ulp="random", seed=11
    )
    np.testing.assert_array_equal(y[:100], y[100:])


def test_precise_and_fast_math_have_their_own_bounds(ulp_lib):
    up = _run(ulp_lib, ulp="up")
    x20 = np.where(X == 20.0)[0][0]  # fast exp may be 3 + 40 ulp off at x = 20, precise 4
    exact = np.exp(20.0)
    assert (up[x20, 2] - exact) / _ulp(exact)[()] > 30
    assert (up[x20, 1] - exact) / _ulp(exact)[()] <= 4


def test_half_results_round_the_perturbed_float(ulp_lib):
    # half math is float math rounded once: a perturbation of a few float ulps moves a half
    # result by at most one half ulp (when it crosses a rounding boundary), and rarely.
    y = _run(ulp_lib, ulp="up")
    with np.errstate(over="ignore", invalid="ignore"):  # exp(20) is no half
        want = np.exp(X.astype(np.float16).astype(np.float64)).astype(np.float16)
    ok = np.isfinite(want)
    want = np.where(ok, want, np.float16(0))
    got = y[:, 11].astype(np.float16)
    half_ulp = np.nextafter(np.abs(want), np.float16(np.inf)) - np.abs(want)
    assert (np.abs(got - want)[ok] <= half_ulp[ok]).all()
    assert (got == want)[ok].mean() > 0.9


def test_bad_mode_is_an_error(ulp_lib):
    with pytest.raises(msim.MetalError, match="ulp must be off, random, up or down"):
        _run(ulp_lib, ulp="sideways")
