"""msim on Metal nobody here wrote: llama.cpp's ggml-metal kernels and MLX's kernel headers,
fetched at test time (tests/msim/corpora.py). Each file is reported compiled or rejected with
the reason; a few kernels run against numpy with the argument layouts their own host code uses
(ggml-metal-ops.cpp and ggml-metal-device.cpp for ggml, mlx/backend/metal/softmax.cpp for MLX).

By default a quick subset compiles; MSIM_CORPORA_FULL=1 compiles every file."""

from __future__ import annotations

import concurrent.futures
import ctypes
import re
import textwrap
from pathlib import Path

import corpora
import numpy as np
import pytest

import msim

GGML_DEFINES = ["GGML_METAL_HAS_BF16=1"]  # as ggml sets it for a GPU with bfloat support
GGML_QUICK = ["norm.metal", "softmax.metal", "mul_mv.metal", "unary.metal"]
MLX_QUICK = ["softmax.h", "reduce.h", "complex.h", "scan.h", "sort.h"]
# Headers a family's kernels include first (MLX's own .metal files do the same).
MLX_FAMILY_PRELUDE = [
    ("reduce", "reduction/ops.h"),
    ("reduction/", "reduction/ops.h"),
    ("indexing/", "indexing/indexing.h"),
    ("steel/gemm/kernels/", "steel/gemm/gemm.h"),
    ("steel/attn/kernels/", "steel/attn/attn.h"),
    ("steel/conv/", "steel/conv/params.h"),
    ("steel/conv/", "steel/conv/conv.h"),
    ("searchsorted", "sort.h"),
    ("quantized", "steel/gemm/gemm.h"),
    ("fp_quantized", "steel/gemm/gemm.h"),
]
# A translation unit needs at least this share of the files to compile (issue's goal: 90%).
GGML_MIN_SHARE = 0.9


def _first_error(e: Exception) -> str:
    lines = str(e).splitlines()
    err = next((ln for ln in lines if " error: " in ln), lines[0] if lines else str(e))
    return re.sub(r"^.*?(\w[\w.-]*\.(metal|h):\d+)", r"\1", err).strip()


def _report(title: str, rows: list[tuple[str, str]]) -> str:
    ok = sum(1 for _, r in rows if r.startswith("compiled"))
    out = [f"{title}: {ok}/{len(rows)} compiled", "", "| file | result |", "| --- | --- |"]
    out += [f"| {name} | {result} |" for name, result in rows]
    text = "\n".join(out) + "\n"
    folder = corpora.cache_root() / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / (re.sub(r"\W+", "-", title.lower()).strip("-") + ".md")).write_text(text)
    print("\n" + text)
    return text


def _check_all(jobs: dict[str, tuple]) -> dict[str, str]:
    """name -> "compiled" or "rejected: <first error>", checking in parallel (clang processes)."""

    def one(args):
        try:
            msim.check(*args, mode="syntax")
            return "compiled"
        except msim.BuildError as e:
            return f"rejected: {_first_error(e)}"

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(zip(jobs, pool.map(one, jobs.values())))


# ---- llama.cpp (ggml-metal) ----


class Ggml:
    def __init__(self, root: Path):
        self.root = root
        self.kernels = root / "ggml-metal" / "kernels"
        self.include = [self.kernels, root / "ggml-metal", root]
        self.impl = (root / "ggml-metal" / "ggml-metal-impl.h").read_text()

    def define(self, name: str) -> int:
        """A numeric #define of ggml-metal-impl.h (function constant bases, rows per simdgroup)."""
        return int(re.search(rf"#define\s+{name}\s+(\d+)", self.impl).group(1))

    def load(self, file: str, kernels: list[str]) -> msim.Library:
        return msim.load([self.kernels / file], self.include, defines=GGML_DEFINES, kernels=kernels)


@pytest.fixture(scope="module")
def ggml() -> Ggml:
    return Ggml(corpora.require(corpora.LLAMA_CPP))


def test_llama_cpp_corpus_compiles(ggml):
    files = sorted(p.name for p in ggml.kernels.glob("*.metal"))
    assert len(files) >= 30, files
    # Shared fragments (`#include "fa_common.metal"`) are not translation units: ggml's build
    # compiles them as part of the files that include them, and so does this report.
    includers: dict[str, list[str]] = {}
    for f in files:
        for inc in re.findall(r'#include\s+"([\w.]+\.metal)"', (ggml.kernels / f).read_text()):
            includers.setdefault(inc, []).append(f)
    units = [f for f in files if f not in includers]
    chosen = units if corpora.FULL else [f for f in GGML_QUICK if f in units]
    results = _check_all({f: ([ggml.kernels / f], ggml.include, GGML_DEFINES) for f in chosen})
    rows = []
    for f in files:
        if f in results:
            rows.append((f, results[f]))
        elif f in includers and all(i in results for i in includers[f]):
            fine = all(results[i] == "compiled" for i in includers[f])
            rows.append(
                (f, ("compiled" if fine else "rejected") + f" (fragment of {len(includers[f])})")
            )
    text = _report(f"llama.cpp {corpora.LLAMA_CPP.version} ggml-metal", rows)
    compiled = sum(1 for _, r in rows if r.startswith("compiled"))
    if corpora.FULL:
        assert compiled >= GGML_MIN_SHARE * len(files), text
    else:
        assert compiled == len(rows), text


def _tensor_strides(shape_ne, elem_bytes):
    """ggml's nb[] for a contiguous tensor with ne[] = shape_ne (innermost first)."""
    nb = [elem_bytes]
    for ne in shape_ne[:-1]:
        nb.append(nb[-1] * ne)
    return nb


I3, U3 = ctypes.c_int32 * 3, ctypes.c_uint64 * 3


class KargsNorm(ctypes.Structure):  # ggml_metal_kargs_norm (ggml-metal-impl.h)
    _fields_ = [
        ("ne00", ctypes.c_int32),
        ("ne00_t", ctypes.c_int32),
        ("nb1", ctypes.c_uint64),
        ("nb2", ctypes.c_uint64),
        ("nb3", ctypes.c_uint64),
        ("eps", ctypes.c_float),
        ("nef1", I3),
        ("nef2", I3),
        ("nef3", I3),
        ("nbf1", U3),
        ("nbf2", U3),
        ("nbf3", U3),
        ("scale", ctypes.c_float),
    ]


@pytest.mark.parametrize("ne00", [1001, 4096, 64])
def test_ggml_rms_norm(ggml, ne00):
    # ggml_metal_op_norm: args at 0, src0 at 1, the fused operands at 2 and 3 (src0 again when
    # nothing is fused), dst at 4, 32 floats of threadgroup memory, one threadgroup per row.
    lib = ggml.load("norm.metal", ["kernel_rms_norm_f32", "kernel_rms_norm_f32_4"])
    ne01, ne02, ne03, eps = 3, 2, 2, 1e-6
    x = np.random.default_rng(ne00).standard_normal((ne03, ne02, ne01, ne00)).astype(np.float32)
    y = np.full_like(x, np.nan)
    vec4 = ne00 % 4 == 0
    ne00_t = ne00 // 4 if vec4 else ne00
    _, nb1, nb2, nb3 = _tensor_strides([ne00, ne01, ne02, ne03], 4)
    args = KargsNorm(
        ne00, ne00_t, nb1, nb2, nb3, eps, I3(ne01), I3(ne02), I3(ne03), U3(nb1), U3(nb2), U3(nb3), 1
    )
    nth = 32
    while nth < ne00_t and nth < 1024:
        nth *= 2
    nth = min(nth, 1024, (ne00_t + 31) // 32 * 32)
    lib.dispatch(
        "kernel_rms_norm_f32" + ("_4" if vec4 else ""),
        [args, x, x, x, y],
        (nth,),
        threadgroups=(ne01, ne02, ne03),
        tg_mem={0: 32 * 4},
        constants={ggml.define("FC_NORM"): False},
        uninit_check=1,
    )
    xd = x.astype(np.float64)
    np.testing.assert_allclose(y, xd / np.sqrt((xd * xd).mean(-1, keepdims=True) + eps), rtol=2e-6)


class KargsSoftMax(ctypes.Structure):  # ggml_metal_kargs_soft_max
    _fields_ = (
        [(n, ctypes.c_int32) for n in ("ne00", "ne01", "ne02")]
        + [(n, ctypes.c_uint64) for n in ("nb01", "nb02", "nb03")]
        + [(n, ctypes.c_int32) for n in ("ne11", "ne12", "ne13")]
        + [(n, ctypes.c_uint64) for n in ("nb11", "nb12", "nb13", "nb1", "nb2", "nb3")]
        + [(n, ctypes.c_float) for n in ("scale", "max_bias", "m0", "m1")]
        + [("n_head_log2", ctypes.c_int32)]
    )


@pytest.mark.parametrize(
    "ne00,ne01,ne02,max_bias,masked",
    [
        (1001, 5, 4, 0.0, True),
        (4096, 1, 2, 8.0, True),
        (40, 3, 4, 8.0, True),
        (128, 2, 1, 0, False),
    ],
)
def test_ggml_soft_max(ggml, ne00, ne01, ne02, max_bias, masked):
    # ggml_metal_op_soft_max: args at 0, src0 at 1, the mask at 2 and the sinks at 3 (src0 when
    # absent), dst at 4; 32 floats of threadgroup memory; threads grow while rows are few.
    lib = ggml.load("softmax.metal", ["kernel_soft_max_f32", "kernel_soft_max_f32_4"])
    rng = np.random.default_rng(ne00)
    ne03, scale = 1, 0.5
    x = rng.standard_normal((ne03, ne02, ne01, ne00)).astype(np.float32)
    mask = rng.standard_normal((ne01, ne00)).astype(np.float32)
    y = np.full_like(x, np.nan)
    n_head_log2 = 1 << int(np.floor(np.log2(ne02)))
    m0 = 2.0 ** (-max_bias / n_head_log2)
    m1 = 2.0 ** (-(max_bias / 2.0) / n_head_log2)
    _, nb01, nb02, nb03 = _tensor_strides([ne00, ne01, ne02, ne03], 4)
    _, nb11, nb12, nb13 = _tensor_strides([ne00, ne01, 1, 1], 4)
    args = KargsSoftMax(
        ne00, ne01, ne02, nb01, nb02, nb03, ne01, 1, 1, nb11, nb12, nb13, nb01, nb02, nb03,
        scale, max_bias, m0, m1, n_head_log2,
    )  # fmt: skip
    nth, limit = 32, (ne00 // 4 if ne00 % 4 == 0 else ne00)
    while nth < limit and nth * ne01 * ne02 * ne03 < 256:
        nth *= 2
    lib.dispatch(
        "kernel_soft_max_f32" + ("_4" if ne00 % 4 == 0 else ""),
        [args, x, mask if masked else x, x, y],
        (nth,),
        threadgroups=(ne01, ne02, ne03),
        tg_mem={0: 32 * 4},
        uninit_check=1,
    )
    h = np.arange(ne02)
    slope = np.ones(ne02)
    if max_bias > 0:
        slope = np.where(h < n_head_log2, m0 ** (h + 1.0), m1 ** (2.0 * (h - n_head_log2) + 1))
    z = x.astype(np.float64) * scale
    if masked:
        z = z + slope[None, :, None, None] * mask[None, None]
    ref = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(y, ref / ref.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)


class KargsMulMv(ctypes.Structure):  # ggml_metal_kargs_mul_mv
    _fields_ = (
        [(n, ctypes.c_int32) for n in ("ne00", "ne01", "ne02")]
        + [(n, ctypes.c_uint64) for n in ("nb00", "nb01", "nb02", "nb03")]
        + [(n, ctypes.c_int32) for n in ("ne10", "ne11", "ne12")]
        + [(n, ctypes.c_uint64) for n in ("nb10", "nb11", "nb12", "nb13")]
        + [(n, ctypes.c_int32) for n in ("ne0", "ne1", "nr0")]
        + [("r2", ctypes.c_int16), ("r3", ctypes.c_int16)]
    )


QK4_0 = 32
BLOCK_Q4_0 = np.dtype([("d", np.float16), ("qs", np.uint8, QK4_0 // 2)])  # ggml-common.h


def q4_0_weights(rng, rows, cols):
    """Random q4_0 blocks and their dequantization: x = d * (q - 8), low nibbles first."""
    w = np.zeros((rows, cols // QK4_0), BLOCK_Q4_0)
    w["d"] = (rng.random(w.shape) * 0.1).astype(np.float16)
    w["qs"] = rng.integers(0, 256, (*w.shape, QK4_0 // 2), dtype=np.uint8)
    q = np.concatenate([w["qs"] & 0xF, w["qs"] >> 4], axis=-1).astype(np.float64) - 8
    return w, (q * w["d"].astype(np.float64)[..., None]).reshape(rows, cols)


def run_mul_mv_q4_0(ggml, w_buffer, x, ne01, **options):
    """ggml_metal_op_mul_mat's mat-vec path for q4_0: args at 0, weights at 1, activations at
    2, dst at 3; nsg simdgroups of 32 threads, nr0 rows per simdgroup; no threadgroup memory
    (the host binds a 0-byte block); the pipeline's function constants."""
    lib = ggml.load("mul_mv.metal", ["kernel_mul_mv_q4_0_f32"])
    ne11, ne00 = x.shape
    nsg, nr0 = ggml.define("N_SG_Q4_0"), ggml.define("N_R0_Q4_0")
    nb01 = ne00 // QK4_0 * BLOCK_Q4_0.itemsize
    nb11 = ne00 * 4
    args = KargsMulMv(
        ne00, ne01, 1, BLOCK_Q4_0.itemsize, nb01, nb01 * ne01, nb01 * ne01,
        ne00, ne11, 1, 4, nb11, nb11 * ne11, nb11 * ne11, ne01, ne11, nr0, 1, 1,
    )  # fmt: skip
    fc = ggml.define("FC_MUL_MV")
    y = np.full((ne11, ne01), np.nan, np.float32)
    lib.dispatch(
        "kernel_mul_mv_q4_0_f32",
        [args, w_buffer, x, y],
        (32, nsg, 1),
        threadgroups=((ne01 + nr0 * nsg - 1) // (nr0 * nsg), ne11, 1),
        tg_mem={0: 0},
        constants={fc + 0: nsg, fc + 2: 1, fc + 3: 1, fc + 4: 1, fc + 5: False},
        **options,
    )
    return y


@pytest.mark.parametrize("ne00,ne01,ne11", [(256, 24, 3), (4096, 19, 1), (1024, 8, 2)])
def test_ggml_mul_mv_q4_0_f32(ggml, ne00, ne01, ne11):
    rng = np.random.default_rng(ne01)
    w, w_dequant = q4_0_weights(rng, ne01, ne00)
    x = rng.standard_normal((ne11, ne00)).astype(np.float32)
    # The kernel reads whole groups of nr0 * nsg rows (see docs/msim-findings.md): like ggml's
    # own allocations, the weights sit inside a larger buffer.
    padded = np.zeros((ne01 + 8, w.shape[1]), BLOCK_Q4_0)
    padded[:ne01] = w
    y = run_mul_mv_q4_0(ggml, padded, x, ne01)
    np.testing.assert_allclose(y, x.astype(np.float64) @ w_dequant.T, rtol=1e-5, atol=1e-5)


def test_ggml_mul_mv_q4_0_reads_rows_past_the_tensor(ggml):
    # Finding: with ne01 % (nr0 * nsg) != 0 the last threadgroup reads weight rows beyond ne01
    # (only the stores are guarded). Bound exactly, the tensor's end is a guard page.
    rng = np.random.default_rng(5)
    w, _ = q4_0_weights(rng, 19, 256)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    with pytest.raises(msim.MetalError, match=r"out-of-bounds access to buffer\(1\) 'src0'"):
        run_mul_mv_q4_0(ggml, w, x, 19)


# ---- MLX (kernel headers of the mlx-metal wheel) ----

MLX_SOFTMAX = textwrap.dedent(
    """\
    #include <metal_common>
    #include <metal_simdgroup>
    using namespace metal;
    #include "mlx/backend/metal/kernels/utils.h"
    #include "mlx/backend/metal/kernels/softmax.h"
    instantiate_kernel("block_softmax_float32", softmax_single_row, float)
    instantiate_kernel("looped_softmax_float32", softmax_looped, float)
    instantiate_kernel("block_softmax_float16", softmax_single_row, half)
    instantiate_kernel("block_softmax_precise_float16", softmax_single_row, half, float)
    """
)


@pytest.fixture(scope="module")
def mlx_include() -> Path:
    return corpora.require(corpora.MLX)


def test_mlx_headers_compile(mlx_include, tmp_path):
    kernels = mlx_include / "mlx" / "backend" / "metal" / "kernels"
    headers = sorted(str(p.relative_to(kernels)) for p in kernels.rglob("*.h"))
    chosen = headers if corpora.FULL else MLX_QUICK
    jobs = {}
    for h in chosen:
        # MLX composes its kernel sources from utils.h, atomic.h, a family's shared header and
        # the kernel's header (as its .metal files and JIT sources do); so does this check.
        prelude = ["utils.h", "atomic.h"] + [
            dep for prefix, dep in MLX_FAMILY_PRELUDE if h.startswith(prefix) and h != dep
        ]
        unit = tmp_path / (re.sub(r"\W", "_", h) + ".metal")
        unit.write_text(
            "#include <metal_stdlib>\nusing namespace metal;\n"
            + "".join(f'#include "mlx/backend/metal/kernels/{x}"\n' for x in prelude + [h])
        )
        jobs[h] = ([unit], [mlx_include], ())
    results = _check_all(jobs)
    text = _report(f"MLX {corpora.MLX.version} kernel headers", sorted(results.items()))
    if not corpora.FULL:
        assert all(r == "compiled" for r in results.values()), text


@pytest.fixture(scope="module")
def mlx_softmax(mlx_include, tmp_path_factory):
    src = tmp_path_factory.mktemp("mlx") / "softmax.metal"
    src.write_text(MLX_SOFTMAX)
    return msim.load([src], include_dirs=[mlx_include])


def mlx_softmax_launch(axis_size: int) -> tuple[str, int]:
    """mlx/backend/metal/softmax.cpp: rows up to 4096 (SOFTMAX_LOOPED_LIMIT) run the block kernel
    with one simdgroup per 128 elements (4 reads per thread); longer rows the looped kernel with
    the pipeline's maximum, 1024 threads."""
    if axis_size > 4096:
        return "looped", 1024
    n_reads, simd = 4, 32
    threads_needed = (axis_size + n_reads - 1) // n_reads
    return "block", simd * ((threads_needed + simd - 1) // simd)


@pytest.mark.parametrize("axis_size,rows", [(1000, 3), (33, 4), (4096, 2), (5000, 2)])
def test_mlx_softmax(mlx_softmax, axis_size, rows):
    kind, tg = mlx_softmax_launch(axis_size)
    x = (np.random.default_rng(axis_size).standard_normal((rows, axis_size)) * 3).astype(np.float32)
    y = np.full_like(x, np.nan)
    # in at buffer 0, out at 1, axis_size at 2 (set_bytes); dispatchThreads(rows * tg).
    mlx_softmax.dispatch(
        f"{kind}_softmax_float32", [x, y, np.int32(axis_size)], (tg,), threads=(rows * tg,),
        uninit_check=1,
    )  # fmt: skip
    xd = x.astype(np.float64)
    ref = np.exp(xd - xd.max(-1, keepdims=True))
    np.testing.assert_allclose(y, ref / ref.sum(-1, keepdims=True), rtol=1e-5, atol=1e-8)


def test_mlx_softmax_half_with_float_accumulation(mlx_softmax):
    x = np.random.default_rng(7).standard_normal((2, 700)).astype(np.float16)
    y = np.zeros_like(x)
    _, tg = mlx_softmax_launch(700)
    mlx_softmax.dispatch(
        "block_softmax_precise_float16", [x, y, np.int32(700)], (tg,), threads=(2 * tg,)
    )
    xd = x.astype(np.float64)
    ref = np.exp(xd - xd.max(-1, keepdims=True))
    np.testing.assert_allclose(y, ref / ref.sum(-1, keepdims=True), rtol=4e-3, atol=1e-6)


def test_mlx_softmax_looped_needs_1024_threads(mlx_softmax):
    # Finding: softmax_looped reads all 32 per-simdgroup partial slots, which exist only when
    # the threadgroup has 32 simdgroups. MLX's host always launches 1024 threads; with 256 the
    # result depends on never-written threadgroup memory.
    x = np.random.default_rng(1).standard_normal((2, 5000)).astype(np.float32)
    y = np.zeros_like(x)
    with pytest.raises(msim.MetalError, match="depends on never-written threadgroup memory"):
        mlx_softmax.dispatch(
            "looped_softmax_float32", [x, y, np.int32(5000)], (256,), threads=(512,),
            uninit_check=1,
        )  # fmt: skip
