"""msim runs real MSL correctly: test kernels against numpy/torch references."""

import numpy as np
import pytest
import torch

import msim

RNG = np.random.default_rng(0)
DTYPES = {"float": torch.float32, "half": torch.float16, "bfloat": torch.bfloat16}
TOL = {"float": 1e-5, "half": 2e-3, "bfloat": 1.6e-2}


def silu_ref(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf / (1 + torch.exp(-xf))).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,tpg", [(1, 32), (31, 32), (33, 32), (1000, 256), (4097, 96)])
def test_silu_dtypes_and_tails(lib, dtype, n, tpg):
    x = torch.randn(n, dtype=torch.float32).to(DTYPES[dtype])
    y = torch.full((n,), 7.0, dtype=DTYPES[dtype])
    lib.dispatch(f"silu_{dtype}", [x, y, n], (tpg,), threads=(n,))
    torch.testing.assert_close(y.float(), silu_ref(x).float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_silu_half_rounds_per_operation(lib):
    # With per-op fp16 rounding the result equals the fp16 rounding of the fp32 formula here,
    # since the kernel computes in float and converts once.
    x = np.linspace(-8, 8, 513, dtype=np.float16)
    y = np.empty_like(x)
    lib.dispatch("silu_half", [x, y, x.size], (64,), threads=(x.size,))
    xf = x.astype(np.float32)
    np.testing.assert_array_equal(y, (xf / (1 + np.exp(-xf))).astype(np.float16))


@pytest.mark.parametrize("n", [4, 1001, 4094])
def test_silu_vec4_body_and_tail(lib, n):
    x = RNG.standard_normal(n).astype(np.float32)
    y = np.zeros_like(x)
    lib.dispatch("silu_vec4", [x, y, n], (64,), threads=((n + 3) // 4,))
    np.testing.assert_allclose(y, x / (1 + np.exp(-x)), rtol=1e-6)


def test_vector_constructors_swizzles_conversions(lib):
    h = (RNG.standard_normal((5, 4)) * 3).astype(np.float16)
    out = np.zeros((10, 4), np.float32)
    iout = np.zeros((5, 4), np.int32)
    lib.dispatch("vector_features", [h, out, iout], (5,), threads=(5,))
    f = h.astype(np.float32)
    g = np.concatenate([f[:, :2], f[:, 2:] * 2], axis=1)
    g[:, [0, 1]] = g[:, [1, 0]]
    np.testing.assert_array_equal(out[0::2], g)
    extra = np.stack([f[:, 3], np.ones(5), np.full(5, 2.0), np.full(5, 3.0)], axis=1)
    np.testing.assert_allclose(out[1::2], 0.5 + f + extra, rtol=1e-6)
    np.testing.assert_array_equal(iout, np.trunc(f) + np.trunc(np.clip(f, -1, 1) * 10))


def rmsnorm_ref(x, w, eps):
    xf, wf = x.float(), w.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * wf).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows,cols,tpg", [(3, 100, 32), (5, 1000, 48), (2, 33, 96), (4, 513, 1024), (64, 4096, 256)]
)
def test_rmsnorm(lib, dtype, rows, cols, tpg):
    x = torch.randn(rows, cols).to(DTYPES[dtype])
    w = torch.rand(cols).to(DTYPES[dtype])
    y = torch.empty_like(x)
    lib.dispatch(
        f"rmsnorm_{dtype}", [x, w, y, cols, np.float32(1e-6)], (tpg,), threadgroups=(rows,)
    )
    torch.testing.assert_close(
        y.float(), rmsnorm_ref(x, w, 1e-6).float(), rtol=TOL[dtype] * 2, atol=TOL[dtype] * 2
    )


def test_rmsnorm_ci_size_1024_threads(lib):
    x = torch.randn(64, 4096)
    w = torch.rand(4096)
    y = torch.empty_like(x)
    lib.dispatch("rmsnorm_float", [x, w, y, 4096, np.float32(1e-6)], (1024,), threadgroups=(64,))
    torch.testing.assert_close(y, rmsnorm_ref(x, w, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lane_order", ["forward", "reverse", "random"])
@pytest.mark.parametrize("tg_order", ["forward", "random"])
def test_results_do_not_depend_on_execution_order(lib, lane_order, tg_order):
    x = torch.randn(9, 300)
    w = torch.rand(300)
    ref = torch.empty_like(x)
    lib.dispatch("rmsnorm_float", [x, w, ref, 300, np.float32(1e-6)], (96,), threadgroups=(9,))
    y = torch.empty_like(x)
    lib.dispatch(
        "rmsnorm_float",
        [x, w, y, 300, np.float32(1e-6)],
        (96,),
        threadgroups=(9,),
        lane_order=lane_order,
        tg_order=tg_order,
        seed=7,
    )
    assert torch.equal(y, ref)


def test_simd_collectives_with_partial_simdgroup(lib):
    # 40 threads per threadgroup: simd-groups of 32 and 8 lanes.
    n, tpg = 80, 40
    x = RNG.integers(-5, 6, n).astype(np.int32)
    out = np.zeros((n, 8), np.int32)
    lib.dispatch("simd_ops", [x, out], (tpg,), threads=(n,))
    for start in range(0, n, tpg):
        for lo, size in ((0, 32), (32, 8)):
            v = x[start + lo : start + lo + size]
            o = out[start + lo : start + lo + size]
            np.testing.assert_array_equal(o[:, 0], np.cumsum(v) - v)
            np.testing.assert_array_equal(o[:, 1], np.cumsum(v))
            np.testing.assert_array_equal(o[1::2, 2], np.full(size // 2, v.sum()))
            np.testing.assert_array_equal(o[0::2, 2], np.full(size // 2, v[0::2].sum()))
            np.testing.assert_array_equal(o[:, 3], np.full(size, v.max()))
            down = np.append(v[1:], v[-1] if size == 32 else -1)  # lane 31 keeps its own value;
            np.testing.assert_array_equal(o[:, 4], down)  # a missing lane reads poison (-1)
            np.testing.assert_array_equal(o[:, 5], v.reshape(-1, 2)[:, ::-1].reshape(-1))
            np.testing.assert_array_equal(o[:, 6], np.full(size, v[0]))
            mask = sum(1 << i for i in range(size) if v[i] > 0)
            np.testing.assert_array_equal(o[:, 7].view(np.uint32), np.full(size, mask))


@pytest.mark.parametrize("n,tpg", [(1000, 128), (77, 40)])
def test_stream_compaction(lib, n, tpg):
    x = RNG.standard_normal(n).astype(np.float32)
    out = np.zeros(n, np.float32)
    count = np.zeros(1, np.uint32)
    lib.dispatch("compact", [x, out, count, n], (tpg,), threads=(n,))
    kept = x[x > 0]
    assert count[0] == kept.size
    np.testing.assert_array_equal(np.sort(out[: kept.size]), np.sort(kept))


@pytest.mark.parametrize("tile", [16, 8])
@pytest.mark.parametrize("rows,cols", [(37, 50), (16, 16), (1, 70)])
def test_tiled_transpose_with_partial_tiles(lib, rows, cols, tile):
    a = RNG.standard_normal((rows, cols)).astype(np.float32)
    out = np.zeros((cols, rows), np.float32)
    shape = np.array([rows, cols], np.uint32)
    groups = ((cols + tile - 1) // tile, (rows + tile - 1) // tile)
    lib.dispatch(f"transpose{tile}", [a, out, shape], (tile, tile), threadgroups=groups)
    np.testing.assert_array_equal(out, a.T)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_simdgroup_matrix_matmul(lib, dtype):
    m, n, k = 16, 24, 32
    a = RNG.standard_normal((m, k)).astype(dtype)
    b = RNG.standard_normal((k, n)).astype(dtype)
    c = np.zeros((m, n), np.float32)
    name = "matmul8_float" if dtype == np.float32 else "matmul8_half"
    lib.dispatch(
        name, [a, b, c, np.array([m, n, k], np.uint32)], (32,), threadgroups=(n // 8, m // 8)
    )
    np.testing.assert_allclose(c, a.astype(np.float32) @ b.astype(np.float32), rtol=1e-4, atol=1e-4)


def test_histogram_threadgroup_and_device_atomics(lib):
    x = RNG.integers(0, 1000, 1000).astype(np.uint32)
    bins = np.zeros(16, np.uint32)
    lib.dispatch("histogram", [x, bins, x.size], (64,), threads=(x.size,))
    np.testing.assert_array_equal(bins, np.bincount(x % 16, minlength=16))


def test_float_and_int_atomics(lib):
    x = RNG.random(300).astype(np.float32)
    total = np.zeros(1, np.float32)
    maxv = np.full(1, -1, np.int32)
    lib.dispatch("atomic_sum", [x, total, maxv], (64,), threads=(300,))
    np.testing.assert_allclose(total[0], x.sum(dtype=np.float64), rtol=1e-5)
    assert maxv[0] == int((x * 100).astype(np.float32).max())


def test_buffer_offsets_and_lengths(lib):
    x = RNG.standard_normal(100).astype(np.float32)
    y = np.zeros(100, np.float32)
    lib.dispatch(
        "silu_float", [msim.Buffer(x, 40, 40), msim.Buffer(y, 80, 40), 10], (32,), threads=(10,)
    )
    np.testing.assert_allclose(y[20:30], x[10:20] / (1 + np.exp(-x[10:20])), rtol=1e-6)
    assert not y[:20].any() and not y[30:].any()


def test_function_constants_values_optional_buffers_and_derived(lib):
    x = np.arange(8, dtype=np.float32)
    y = np.zeros(8, np.float32)
    bias = np.full(8, 10.0, np.float32)
    lib.dispatch("affine", [x, y, bias], (8,), threads=(8,), constants={0: True, 1: 2.0})
    np.testing.assert_array_equal(y, 2 * x + 10)
    lib.dispatch("affine", [x, y], (8,), threads=(8,), constants={0: False, 1: 3.0})
    np.testing.assert_array_equal(y, 3 * x)  # buffer(2) does not exist when has_bias is false
    with pytest.raises(msim.MetalError, match=r"'bias' \[\[buffer\(2\)\]\] is not bound"):
        lib.dispatch("affine", [x, y], (8,), threads=(8,), constants={0: True, 1: 1.0})
    with pytest.raises(msim.MetalError, match=r"function constant 1 used at .*features\.metal:\d+"):
        lib.dispatch("affine", [x, y], (8,), threads=(8,), constants={0: False})


def test_simdgroup_matrix_thread_elements_lane_layout(lib):
    coords = np.zeros((8, 8), np.float32)
    out = np.zeros((8, 8), np.float32)
    lib.dispatch("fragment_layout", [coords, out], (32,), threadgroups=(1,))
    np.testing.assert_array_equal(coords, np.arange(64).reshape(8, 8))
    np.testing.assert_array_equal(out, 2 * np.arange(64).reshape(8, 8))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("rows,cols,tpg", [(3, 7, 32), (4, 1000, 128), (2, 4099, 256)])
def test_mlx_style_looped_softmax(lib, dtype, rows, cols, tpg):
    x = (torch.randn(rows, cols) * 4).to(getattr(torch, dtype))
    y = torch.empty_like(x)
    lib.dispatch(f"softmax_looped_{dtype}", [x, y, np.int32(cols)], (tpg,), threadgroups=(rows,))
    ref = torch.softmax(x.float(), -1)
    tol = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 8e-3}[dtype]
    torch.testing.assert_close(y.float(), ref, rtol=tol * 10, atol=tol)


def test_quad_group_functions(lib):
    x = RNG.integers(-9, 10, 64).astype(np.int32)
    out = np.zeros((64, 5), np.int32)
    lib.dispatch("quad_ops", [x, out], (64,), threads=(64,))
    quads = x.reshape(-1, 4)
    np.testing.assert_array_equal(out[:, 0], np.repeat(quads.sum(1), 4))
    np.testing.assert_array_equal(out[:, 1], quads[:, [1, 0, 3, 2]].reshape(-1))
    np.testing.assert_array_equal(out[:, 2], np.repeat(quads[:, 3], 4))
    np.testing.assert_array_equal(out[:, 3], (np.cumsum(quads, 1) - quads).reshape(-1))
    np.testing.assert_array_equal(out[:, 4], np.tile(np.arange(4), 16))


def test_matrix_types(lib):
    cols = RNG.standard_normal((4, 4)).astype(np.float32)  # cols[c] is column c
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    y = np.zeros((3, 4), np.float32)
    lib.dispatch("matrix_types", [cols, x, y], (3,), threads=(3,))
    m = cols.T  # as a row-major numpy matrix
    ref = (m.T @ (m @ x.T)).T + cols[1] + np.array([0, 0, 2, 0], np.float32)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
