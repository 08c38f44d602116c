"""Minimal reproducers of the defects msim found in other projects' kernels (findings/latent.metal,
docs/msim-findings.md): each is reported by msim in the launch that exposes it, and its fixed
twin runs clean. The upstream kernels themselves are run in test_corpora.py."""

import numpy as np
import pytest
from msim_paths import REPO_ROOT

import msim


@pytest.fixture(scope="module")
def latent():
    return msim.load([REPO_ROOT / "tests" / "msim" / "findings" / "latent.metal"])


def _row_sums(lib, name, threads, rows=3, n=3000, **options):
    x = np.random.default_rng(0).standard_normal((rows, n)).astype(np.float32)
    out = np.zeros(rows, np.float32)
    lib.dispatch(name, [x, out, np.uint32(n)], (threads,), threadgroups=(rows,), **options)
    return out, x.astype(np.float64).sum(1)


@pytest.mark.parametrize("name", ["partials_no_clear", "partials_own_clear"])
def test_partial_slots_exist_only_with_1024_threads(latent, name):
    out, want = _row_sums(latent, name, 1024, uninit_check=1)  # 32 simdgroups: every slot written
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-3)
    with pytest.raises(msim.MetalError, match="depends on never-written threadgroup memory"):
        _row_sums(latent, name, 256, uninit_check=1)
    out, _ = _row_sums(latent, name, 256)  # the poison (0xFF: NaN) reaches the result
    assert np.isnan(out).all()


@pytest.mark.parametrize("threads", [32, 256, 1024])
def test_partial_slots_fixed(latent, threads):
    out, want = _row_sums(latent, "partials_fixed", threads, uninit_check=1)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-3)


def _matvec(lib, name, rows, cols=70):
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal(cols).astype(np.float32)
    y = np.zeros(rows, np.float32)
    args = [w, x, y, np.int32(rows), np.int32(cols)]
    lib.dispatch(name, args, (32,), threadgroups=((rows + 3) // 4,))
    return y, w.astype(np.float64) @ x


def test_row_blocked_matvec_reads_past_the_matrix(latent):
    y, want = _matvec(latent, "rows_unguarded", 8)  # a multiple of the block: in bounds
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(msim.MetalError, match=r"out-of-bounds access to buffer\(0\) 'w'"):
        _matvec(latent, "rows_unguarded", 9)
    y, want = _matvec(latent, "rows_fixed", 9)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
