"""Weight-only quantization through the Metal launch layer on msim: every format's dequantize
kernel against the CPU kernel byte for byte, the matrix-vector kernel (m <= 8) and the tiled
kernel (m > 8) on both sides of the crossover, ragged weight rows, K longer than one pass of a
simdgroup, and the backward's tiled kernel. The op contract (numerics against float64, edge
cases, bad inputs) runs on msim from tests/ops/test_contract.py and tests/reliability; these
pin the sizes and formats it would reach only by chance, and dispatch every host name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metalcore.testing import backends as bk
from metalcore.testing import reference as ref
from metalcore.testing.op_specs import QUANT_GGUF, SPECS, pinned

from .conftest import KERNELS

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (op prefix, ggml type or bits): the six formats.
FORMATS = [("int4", 4), ("int8", 8), ("Q4_0", 2), ("Q8_0", 8), ("Q4_K", 12), ("Q6_K", 14)]
GEMV_MAX_ROWS = 8  # kernels/quant.h: kGemvMaxRows


def _ops(fmt: str) -> tuple[str, str, str]:
    if fmt.startswith("int"):
        return f"{fmt}_dequantize", f"{fmt}_linear", f"{fmt}_linear_backward"
    return "gguf_dequantize", "gguf_linear", "gguf_linear_backward"


def _pins(fmt: str, code: int, n: int, units: int, dtype: torch.dtype) -> dict:
    """Pins of a weight with n rows and `units` groups (affine, group size 128) or blocks."""
    pins = {"weight.large": False, "n": n, "dtype": dtype}
    if fmt.startswith("int"):
        pins.update({"group_size": 128, "groups": units, "scales.dtype": dtype})
    else:
        pins.update({"qtype": code, "blocks": units})
    return pins


def _units(fmt: str) -> int:
    # K = 384 (affine: 3 groups of 128; Q4_0/Q8_0: 12 blocks) or 512 (the K-quants): more than
    # one pass of a simdgroup's 256 weights, ending mid-pass for K = 384.
    if fmt in ("Q4_0", "Q8_0"):
        return 12
    return 2 if fmt in ("Q4_K", "Q6_K") else 3


def _weight_args(sample) -> list:
    args, _ = sample.materialize("cpu")
    return args


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("fmt,code", FORMATS)
def test_dequantize_matches_cpu_bytes(mops, fmt, code, dtype):
    # The GGUF decodes are exact products in float (Q6_K's rounded in the CPU's order) and the
    # affine one is one fused multiply-add, as the CPU's AVX2/AVX-512 decode computes it: the
    # Metal kernel must give the same bits. (The CPU's scalar build rounds s * q and + b
    # separately, so there the affine formats may differ by one rounding.)
    deq = _ops(fmt)[0]
    sample = pinned(deq, 3, **_pins(fmt, code, 9, _units(fmt), dtype))
    args, kwargs = sample.materialize("cpu")
    got = getattr(mops, deq)(*args, **kwargs)
    want = getattr(torch.ops.metalcore, deq)(*args, **kwargs)
    assert got.dtype == want.dtype == dtype
    fused_cpu = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    if fmt.startswith("int") and not fused_cpu:
        torch.testing.assert_close(got, want, rtol=2 * torch.finfo(dtype).eps, atol=0)
    else:
        width = {4: torch.int32, 2: torch.int16}[got.element_size()]
        assert torch.equal(got.view(width), want.view(width))


def _product_case(op, fmt, code, n, m, dtype, has_bias, layout, seed=0, **extra):
    pins = _pins(fmt, code, n, _units(fmt), dtype)
    pins.update({"m": m, "batch": (m,), "has_bias": has_bias, **extra})
    pins["input.layout" if op.endswith("linear") else "grad_out.layout"] = layout
    return pinned(op, seed, **pins)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("fmt,code", FORMATS)
def test_linear_gemv_and_gemm(msim_backend, fmt, code, dtype):
    # m = 1 (decode) and m = 9 (just past the matrix-vector kernel) with a bias, 11 weight rows
    # (the last threadgroup of gemv holds 3 rows, gemm's tile 11 of 32 columns).
    _, lin, bwd = _ops(fmt)
    for m, layout in ((1, "offset"), (GEMV_MAX_ROWS + 1, "transposed")):
        case = _product_case(lin, fmt, code, 11, m, dtype, True, layout)
        bk.check_sample(SPECS[lin], msim_backend, case)
    case = _product_case(bwd, fmt, code, 11, 3, dtype, False, "sliced")
    bk.check_sample(SPECS[bwd], msim_backend, case)


@pytest.mark.parametrize("m", [GEMV_MAX_ROWS - 1, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1, 33])
def test_crossover_and_tiles(msim_backend, m):
    # Both sides of the gemv / gemm crossover, and more rows than one tile (33 = 32 + 1) in the
    # forward and backward, with weight rows ending inside a tile (n = 37) and without a bias.
    for op in ("int4_linear", "gguf_linear"):
        case = _product_case(
            op, "int4" if op[0] == "i" else "Q4_0", 2, 37, m, torch.float32, False, "contiguous"
        )
        bk.check_sample(SPECS[op], msim_backend, case)
    case = _product_case(
        "gguf_linear_backward", "Q4_K", 12, 37, m, torch.float32, False, "contiguous"
    )
    bk.check_sample(SPECS["gguf_linear_backward"], msim_backend, case)


def test_gguf_data_at_an_odd_byte(mops):
    # A uint8 view may start at any byte of its storage: the kernels read the fp16 block
    # scales bytewise, so such a view decodes like a fresh copy.
    for code, (bs, ts, _) in QUANT_GGUF.items():
        data = _weight_args(pinned("gguf_dequantize", 1, **_pins("Q", code, 5, 2, torch.float32)))[
            0
        ]
        store = torch.empty(data.numel() + 1, dtype=torch.uint8)
        view = store[1:].view(data.shape)
        view.copy_(data)
        assert view.storage_offset() == 1
        want = torch.ops.metalcore.gguf_dequantize(data, code)
        assert torch.equal(mops.gguf_dequantize(view, code), want)
        x = torch.randn(2, data.shape[1] // ts * bs)
        # The same kernel on aligned bytes: the same sums in the same order.
        assert torch.equal(mops.gguf_linear(x, view, code), mops.gguf_linear(x, data, code))


def test_float64_scales_are_rejected(mops):
    # The affine kernels read scales and biases in their own dtype; Metal has no float64.
    q = torch.zeros(3, 32, dtype=torch.uint8)
    s = torch.ones(3, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"metalcore\.int4_linear: 'scales' must be float16, "):
        mops.int4_linear(torch.randn(2, 64), q, s, s, 32, None)
    with pytest.raises(TypeError, match=r"metalcore\.int4_dequantize: 'scales' must be float16"):
        mops.int4_dequantize(q, s, s, 32)
    with pytest.raises(TypeError, match=r"metalcore\.gguf_dequantize: 'dtype' must be float16"):
        mops.gguf_dequantize(torch.zeros(3, 18, dtype=torch.uint8), 2, torch.float64)


def test_schedules(msim_backend, schedule):
    # The tiled kernels share threadgroup tiles between simdgroups and the gemv kernel reduces
    # across lanes: neither may depend on the order threads run or read a tile slot no thread
    # wrote.
    for op, fmt, code, m in (
        ("int4_linear", "int4", 4, 3),
        ("gguf_linear", "Q6_K", 14, 17),
        ("int8_linear_backward", "int8", 8, 5),
    ):
        case = _product_case(op, fmt, code, 37, m, torch.bfloat16, True, "contiguous")
        bk.check_sample(SPECS[op], msim_backend, case)


def _params(row_bytes, m, n, k, group, fmt):
    """kernels/quant.h's Params as setBytes data (float32 scales and biases, no bias);
    ``fmt`` is the format's index in quant.h (kInt4 = 0 .. kQ6_K = 5)."""
    fields = ["row_bytes", "m", "n", "k", "group", "param_dtype", "flags", "format"]
    dtype = np.dtype({"names": fields, "formats": ["<u8"] + ["<u4"] * 7}, align=True)
    assert dtype.itemsize == 40
    return np.array((row_bytes, m, n, k, group, 0, 0, fmt), dtype=dtype)[()]


def test_tiled_kernels_are_race_free(mops):
    # Race mode (ThreadSanitizer over the simulated threads) on the two kernels with
    # threadgroup memory: 128 threads per threadgroup, within what TSan tracks. The library is
    # the whole kernels/ folder in race mode, the one test_races.py builds (cached by content).
    from msim.race import race_check

    rng = np.random.default_rng(0)
    m, n, k = 9, 37, 256
    x = rng.standard_normal((m, k)).astype(np.float32)
    blocks = torch.from_numpy(rng.integers(0, 256, (n, 144), dtype=np.uint8))
    blocks[:, :4] = torch.full((n, 2), 0.01, dtype=torch.float16).view(torch.uint8)
    data = blocks.numpy()
    want = x.astype(np.float64) @ ref.gguf_dequantize(blocks, 12).numpy().T
    out = np.zeros((m, n), np.float32)
    args = [x, data, data, data, x, out, _params(144, m, n, k, 256, 4)]
    report = race_check(
        [KERNELS],
        "quant_gemm_float32",
        args,
        (128,),
        threadgroups=(2, 1),
        include_dirs=[KERNELS],
    )
    assert report.races == [], report.log[-4000:]
    np.testing.assert_allclose(report.outputs[5], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

    q = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    s = (rng.standard_normal((n, k // 32)) * 0.1).astype(np.float32)
    g = rng.standard_normal((m, n)).astype(np.float32)
    w = ref.affine_dequantize(torch.from_numpy(q), torch.from_numpy(s), torch.from_numpy(s), 32, 4)
    want = g.astype(np.float64) @ w.numpy()
    out = np.zeros((m, k), np.float32)
    args = [g, q, s, s, g, out, _params(k // 2, m, n, k, 32, 0)]
    report = race_check(
        [KERNELS],
        "quant_bwd_float32",
        args,
        (128,),
        threadgroups=(k // 32, 1),
        include_dirs=[KERNELS],
    )
    assert report.races == [], report.log[-4000:]
    np.testing.assert_allclose(report.outputs[5], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize(
    "limit,m,kernel", [(64, 9, "quant_gemm_float32"), (32, 1, "quant_gemv_int4_float32")]
)
def test_pipeline_too_small_raises(mops, max_threads, limit, m, kernel):
    # The kernels run fixed threadgroups (gemv 64 threads, the tiled kernels 128): a pipeline
    # that allows fewer raises naming the kernel instead of running a partial threadgroup.
    max_threads(limit)
    q, s = torch.zeros(3, 32, dtype=torch.uint8), torch.ones(3, 2)
    with pytest.raises(RuntimeError, match=rf"Metal kernel '{kernel}' needs {2 * limit} threads"):
        mops.int4_linear(torch.randn(m, 64), q, s, s, 32, None)


@pytest.mark.parametrize(
    "x_dtype,s_dtype", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32)]
)
def test_scales_in_another_dtype(msim_backend, x_dtype, s_dtype):
    # The affine kernels read scales and biases in their own dtype (a run-time flag), which
    # need not be the activations'.
    for op, m in (("int4_linear", 2), ("int8_linear", 12), ("int4_linear_backward", 4)):
        extra = {"scales.dtype": s_dtype}
        case = _product_case(op, "int", 0, 9, m, x_dtype, True, "contiguous", **extra)
        assert case.args[2].values.dtype == s_dtype
        bk.check_sample(SPECS[op], msim_backend, case)
