"""msim's ulp mode on metalcore's Metal kernels: with every bounded math function (precise::exp,
precise::log, precise::rsqrt, ...) anywhere within the error the MSL specification allows, the
AdamW step and its bias correction stay within tolerance, so the tests hold on any conforming GPU
and not only on a correctly rounded libm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metalcore.testing import reference as ref
from tests.metal.conftest import KERNELS
from tests.metal.test_adamw import DTYPE_PAIRS, check

# off, deterministic pseudo-random deviations (two seeds), and the whole bound up or down.
MODES = [("off", 1), ("random", 1), ("random", 2), ("up", 1), ("down", 1)]
ULP = 2.0**-24  # relative size of half an ulp of a float in [1, 2): the unit of the bounds below

EXPM1_SOURCE = """
#include <metal_stdlib>
#include "common/math.h"
using namespace metal;
kernel void expm1_kernel(device const float* z [[buffer(0)]], device float* y [[buffer(1)]],
                         uint i [[thread_position_in_grid]]) {
  y[i] = metalcore::expm1(z[i]);
}
kernel void naive_expm1(device const float* z [[buffer(0)]], device float* y [[buffer(1)]],
                        uint i [[thread_position_in_grid]]) {
  y[i] = precise::exp(z[i]) - 1.0f;
}
"""


@pytest.fixture(scope="module")
def expm1_lib(tmp_path_factory):
    import msim

    src = tmp_path_factory.mktemp("ulp") / "expm1.metal"
    src.write_text(EXPM1_SOURCE)
    return msim.load([src], include_dirs=[KERNELS])


def bias_correction_arguments() -> np.ndarray:
    """step * log(beta) as the AdamW kernel forms it (steps 1..10^6, betas 0.5 to 0.9999), and
    the edges: 0, tiny, -inf (beta = 0), overflow."""
    betas = np.array([0.5, 0.9, 0.99, 0.999, 0.9999])
    steps = np.unique(np.concatenate([np.arange(1, 300), np.geomspace(1, 1e6, 400).round()]))
    z = (steps[None, :] * np.log(betas)[:, None]).ravel()
    extra = [0.0, 1e-30, -1e-8, 3e-6, -0.3, 0.3, 2.0, -20.0, -90.0, -104.0, 80.0]
    return np.concatenate([z, extra]).astype(np.float32)


def run_expm1(lib, name, z, mode, seed):
    y = np.full_like(z, np.nan)
    lib.dispatch(name, [z, y], (64,), threads=(z.size,), ulp=mode, seed=seed)
    return y


@pytest.mark.parametrize("mode,seed", MODES)
def test_expm1_matches_float64_whatever_exp_and_log_return(expm1_lib, mode, seed):
    z = bias_correction_arguments()
    y = run_expm1(expm1_lib, "expm1_kernel", z, mode, seed)
    want = np.expm1(z.astype(np.float64))
    # Kahan's form: exp's error cancels, log's (4 ulp) and two roundings remain; the largest seen
    # is 12.6 half-ulps (down), the estimate of the worst case about 15.
    nz = want != 0
    rel = np.abs(y[nz].astype(np.float64) - want[nz]) / np.abs(want[nz])
    assert rel.max() <= 16 * ULP, (z[nz][np.argmax(rel)], rel.max() / ULP)
    assert y[z == 0.0][0] == 0.0
    z_edge = np.array([-np.inf, 100.0], np.float32)
    np.testing.assert_array_equal(
        run_expm1(expm1_lib, "expm1_kernel", z_edge, mode, seed), [-1, np.inf]
    )


@pytest.mark.parametrize("mode", ["up", "down"])
def test_ulp_mode_exposes_the_cancelling_form(expm1_lib, mode):
    # What ulp mode is for: exp(z) - 1 is correctly rounded's luck. With precise::exp 4 ulp off,
    # as the spec allows, 1 - 0.9^1 (AdamW's first bias correction) is 2.3e-6 off relatively.
    z = np.array([np.log(0.9)], np.float32)
    want = np.expm1(z.astype(np.float64))
    naive = run_expm1(expm1_lib, "naive_expm1", z, mode, 1)
    assert abs(naive[0] - want[0]) / abs(want[0]) > 1e-6
    assert abs(run_expm1(expm1_lib, "naive_expm1", z, "off", 1)[0] - want[0]) / abs(want[0]) < 1e-6
    kahan = run_expm1(expm1_lib, "expm1_kernel", z, mode, 1)
    assert abs(kahan[0] - want[0]) / abs(want[0]) < 8 * ULP


@pytest.fixture
def ulp_mode(mops):
    """Sets msim's ulp mode and seed for the metalcore_msim ops; restores correct rounding."""

    def set_mode(mode: str, seed: int) -> None:
        mops.set_option("ulp", mode)
        mops.set_option("seed", str(seed))

    yield set_mode
    mops.set_option("ulp", "off")
    mops.set_option("seed", "1")


HP = dict(beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8)


@pytest.mark.parametrize("mode,seed", MODES)
@pytest.mark.parametrize("step", [0.0, 9.0, 999.0])
def test_adamw_update_within_tolerance(mops, ulp_mode, mode, seed, step):
    # Zero params and no weight decay make the new param the update itself (no rounding against
    # a large param hides an error in it), and zero moments keep the moment updates exact (a
    # cancelling m = 0.9 m + 0.1 g would dominate). The first step is where 1 - 0.9^step cancels.
    ulp_mode(mode, seed)
    n = 5000
    g = torch.Generator().manual_seed(int(step) + seed)
    grads = torch.randn(n, generator=g) * torch.logspace(-3, 3, n)
    state = {
        "params": [torch.zeros(n)],
        "grads": [grads],
        "exp_avgs": [torch.zeros(n)],
        "exp_avg_sqs": [torch.zeros(n)],
        "max": [],
        "steps": [torch.tensor(step)],
    }
    want = {k: [t.clone() for t in v] for k, v in state.items()}
    mops.adamw(
        state["params"], state["grads"], state["exp_avgs"], state["exp_avg_sqs"], state["max"],
        state["steps"], torch.tensor(1e-3), HP["beta1"], HP["beta2"], HP["weight_decay"],
        HP["eps"], False, False,
    )  # fmt: skip
    ref.adamw_step_reference(
        want["params"], want["grads"], want["exp_avgs"], want["exp_avg_sqs"], want["max"],
        want["steps"], lr=1e-3, amsgrad=False, maximize=False, **HP,
    )  # fmt: skip
    got, exp = state["params"][0].double(), want["params"][0].double()
    # Measured: at most 8.2e-7 in every mode (2.3e-6 with exp(z) - 1 as the bias correction).
    rel = ((got - exp).abs() / exp.abs()).max().item()
    assert rel < 1.2e-6, rel
    for key in ("exp_avgs", "exp_avg_sqs", "steps"):
        torch.testing.assert_close(state[key][0], want[key][0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mode,seed", MODES[1:])
@pytest.mark.parametrize("pair", [DTYPE_PAIRS[0], DTYPE_PAIRS[3]])
def test_adamw_tolerances_hold_on_any_conforming_gpu(msim_backend, ulp_mode, mode, seed, pair):
    # The op contract's AdamW check (test_adamw.py), with every bounded function at its worst.
    ulp_mode(mode, seed)
    specs = [(4097, *pair), (33, torch.float32, torch.float32), (1000, *pair)]
    check(msim_backend, specs, amsgrad=True, maximize=False)
