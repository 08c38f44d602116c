"""RMSNorm's wide-row CUDA kernels: rows on the streaming plan (too wide to keep in registers, or
not 16-byte aligned) with METALCORE_CUDA_WIDE_ROWS=1 (off by default until validated on a GPU).

The model tests run everywhere: a CPU model of the kernels
(bench/studies/rmsnorm_wide_rows_model.py: their tile plan, index arithmetic and fp32
accumulation order) against float64, ragged tiles included. The GPU tests need CUDA kernels;
they pass with the wide-row kernels on or off and check which kernels ran against the variable
(run them with METALCORE_CUDA_WIDE_ROWS=1 to test the new kernels)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from metalcore.testing import reference as ref
from tests.support import REPO, TOL


def assert_close(actual, expected, dtype=None, rtol=None, atol=None):
    """Against a float64 reference, with the table's tolerance for the dtype unless given."""
    tol = dict(TOL[dtype or actual.dtype])
    tol.update({k: v for k, v in (("rtol", rtol), ("atol", atol)) if v is not None})
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol)


ops = torch.ops.metalcore

_spec = importlib.util.spec_from_file_location(
    "rmsnorm_wide_rows_model", REPO / "bench" / "studies" / "rmsnorm_wide_rows_model.py"
)
model = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = model  # dataclasses look their module up while it executes
_spec.loader.exec_module(model)

# Must match kWideRowsDefault in csrc/rmsnorm/rmsnorm_cuda.cu.
WIDE_ROWS_DEFAULT = False
_env = os.environ.get("METALCORE_CUDA_WIDE_ROWS", "")
WIDE_ROWS_ON = _env == "1" or (_env == "" and WIDE_ROWS_DEFAULT)

EPS = 1e-6


def _dw_tol(dtype, rows):
    """grad_weight tolerance of the CUDA op tests (tests/cuda/test_cuda_ops.py)."""
    base = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-9}
    return base[dtype] * max(1.0, rows**0.5)


# bf16: one more rounding than the reference; the op tests allow the same.
DX_SLACK = {torch.bfloat16: 3 * 1.6e-2, torch.float64: 1e-6}


def inputs(rows, n, dtype, seed, weight=True, grad_res=False, residual=False):
    gen = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(rows, n, generator=gen).to(dtype),
        "g": torch.randn(rows, n, generator=gen).to(dtype),
    }
    t["w"] = (1 + 0.1 * torch.randn(n, generator=gen)).to(dtype) if weight else None
    t["gr"] = torch.randn(rows, n, generator=gen).to(dtype) if grad_res else None
    t["r"] = torch.randn(rows, n, generator=gen).to(dtype) if residual else None
    return t


@pytest.fixture
def one_thread():
    # The model runs many small sequential steps; extra threads only add contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- The model (CPU) -------------------------------------------------------------------------

# (rows, n, dtype, vec, resident tile blocks, weight, grad_residual_out). Small `resident`
# values force several row chunks (the last one short) at rows a CPU model handles quickly;
# widths leave a short last column slice (12296 = 6 slices of 2048 + 8 columns).
MODEL_CASES = [
    (37, 65536, torch.bfloat16, 8, 8, True, False),
    (45, 12296, torch.float16, 8, 16, False, False),
    (29, 8200, torch.float32, 4, 6, True, True),
    (33, 4095, torch.bfloat16, 1, 12, True, True),
    (19, 1001, torch.float64, 1, 3, True, False),
    (5, 7, torch.float32, 1, 1, False, True),
    (300, 2056, torch.float32, 4, 528, True, False),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}-v{c[3]}")
def test_model_backward_matches_float64(case, one_thread):
    rows, n, dtype, vec, resident, with_w, with_gr = case
    t = inputs(rows, n, dtype, seed=rows + n, weight=with_w, grad_res=with_gr)
    dx, dw, plan = model.backward(t["g"], t["x"], t["w"], EPS, t["gr"], resident=resident, vec=vec)
    dx64, dw64 = ref.rmsnorm_backward(t["g"], t["x"], t["w"], EPS)
    if with_gr:
        dx64 = dx64 + t["gr"].double()
    assert_close(dx, dx64, dtype, rtol=DX_SLACK.get(dtype), atol=DX_SLACK.get(dtype))
    if with_w:
        tol = _dw_tol(dtype, rows)
        torch.testing.assert_close(dw.double(), dw64, rtol=tol, atol=tol)
    else:
        assert dw is None
    assert plan.nchunks * plan.rows_per_chunk >= rows > (plan.nchunks - 1) * plan.rows_per_chunk


def test_model_cases_have_ragged_tiles():
    # The cases above exercise what can go wrong at the edges: a short last chunk, several
    # chunks, a short last column slice, one chunk only.
    plans = [
        model.backward_plan(rows, n, dtype, vec, res, w, gr)
        for rows, n, dtype, vec, res, w, gr in MODEL_CASES
    ]
    assert any(
        p.nchunks > 1 and r % p.rows_per_chunk != 0 for p, (r, *_) in zip(plans, MODEL_CASES)
    )
    assert any(p.nchunks == 1 for p in plans)
    short_slice = [
        (n // vec) % (model.tile_cpt(vec, dtype) * model.TILE_THREADS) != 0
        for _, n, dtype, vec, *_ in MODEL_CASES
    ]
    assert any(short_slice)


@pytest.mark.parametrize(
    "rows, n, dtype, vec, residual",
    [
        (6, 65544, torch.bfloat16, 8, False),
        (5, 40000, torch.float16, 8, True),
        (7, 16388, torch.float32, 4, True),
        (9, 8194, torch.float64, 2, False),
        (4, 4095, torch.bfloat16, 1, True),
        (3, 7, torch.float32, 1, False),
    ],
)
def test_model_forward_matches_float64(rows, n, dtype, vec, residual, one_thread):
    t = inputs(rows, n, dtype, seed=n, residual=residual)
    for w in (t["w"], None):
        y, h = model.forward(t["x"], w, EPS, t["r"], vec=vec)
        if residual:
            _, h_ref = ref.fused_add_rmsnorm(t["x"], t["r"], w, EPS)
            torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
        else:
            assert h is None
            h_ref = t["x"]
        y64 = ref.rmsnorm(h_ref.double(), None if w is None else w.double(), EPS)
        assert_close(y, y64, dtype)


def test_tile_plan_on_an_h100():
    # 2048 x 65536 bf16 on 132 multiprocessors with 4 tile blocks each: 32 column slices, 16 row
    # chunks of 128 rows, 512 tiles in one wave; 16 partial rows (4 MiB) for grad_weight.
    p = model.backward_plan(2048, 65536, torch.bfloat16, 8, 4 * 132, True, False)
    assert (p.nslices, p.nchunks, p.rows_per_chunk, p.ntiles) == (32, 16, 128, 512)
    # Without weight there are no partial rows; the plan is the same wave.
    p = model.backward_plan(2048, 65536, torch.bfloat16, 8, 4 * 132, False, False)
    assert (p.nchunks, p.rows_per_chunk) == (16, 128)
    # Few rows: the chunks shrink (to one row here) while the tiles still fit one wave.
    p = model.backward_plan(8, 65536, torch.bfloat16, 8, 4 * 132, True, False)
    assert (p.nchunks, p.rows_per_chunk, p.ntiles) == (8, 1, 256)


def test_model_plan_matches_the_cuda_source(tmp_path):
    # The model's plan_tiles is a copy of the C++ one: compile the C++ (host code, cut from
    # rmsnorm_cuda.cu) and compare both on random inputs.
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = (REPO / "csrc" / "rmsnorm" / "rmsnorm_cuda.cu").read_text()
    start = src.index("struct TilePlan {")
    end = src.index("return best;\n}\n", start) + len("return best;\n}\n")
    (tmp_path / "plan.cpp").write_text(
        "#include <algorithm>\n#include <cstdint>\n#include <cstdio>\n#include <vector>\n"
        "namespace cuda {\n"
        "inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }\n}\n"
        + src[start:end]
        + "int main() {\n  long long v[5];\n"
        '  while (scanf("%lld %lld %lld %lld %lld", v, v + 1, v + 2, v + 3, v + 4) == 5) {\n'
        "    TilePlan p = plan_tiles(v[0], v[1], v[2], v[3], v[4]);\n"
        '    printf("%lld %lld %lld %lld\\n", (long long)p.rows_per_chunk, (long long)p.nchunks,\n'
        "           (long long)p.nslices, (long long)p.ntiles);\n  }\n}\n"
    )
    exe = tmp_path / "plan"
    subprocess.run(
        [cxx, "-std=c++17", "-O1", str(tmp_path / "plan.cpp"), "-o", str(exe)], check=True
    )
    gen = torch.Generator().manual_seed(0)
    cases = [(2048, 32, 528, 12288, 262144), (1, 1, 1, 1, 0)]
    for _ in range(500):
        r = torch.randint(1, 1 << 17, (5,), generator=gen).tolist()
        cases.append((r[0], r[1] % 4000 + 1, r[2] % 2000 + 1, r[3], r[4] * 32 * (r[0] % 2)))
    out = subprocess.run(
        [str(exe)],
        input="".join(" ".join(map(str, c)) + "\n" for c in cases),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    got = [tuple(int(v) for v in out[i : i + 4]) for i in range(0, len(out), 4)]
    want = [dataclasses.astuple(model.plan_tiles(*c)) for c in cases]
    assert got == want


@pytest.mark.parametrize("seed", range(40))
def test_tile_coverage(seed):
    # Every dx element and partial-row element written exactly once, for random shapes, vector
    # widths, tile widths and device sizes.
    gen = torch.Generator().manual_seed(seed)

    def pick(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    rows, vec = pick(1, 70), [1, 2, 4, 8][pick(0, 3)]
    n = vec * pick(1, 3000)
    cpt = 1 if vec > 1 else [1, 2, 4][pick(0, 2)]
    nslices = -(-(n // vec) // (cpt * model.TILE_THREADS))
    plan = model.plan_tiles(rows, nslices, pick(1, 600), pick(1, 1 << 16), pick(0, 1 << 18))
    model.check_tile_coverage(rows, n, vec, cpt, plan)


def test_tile_coverage_check_detects_gaps():
    # The check itself fails on a plan that leaves rows or columns out.
    good = model.plan_tiles(10, 3, 4, 1000, 1000)  # 600 columns: 3 slices of 256
    model.check_tile_coverage(10, 600, 1, 1, good)
    with pytest.raises(AssertionError, match="dx elements"):
        model.check_tile_coverage(10, 600, 1, 1, dataclasses.replace(good, ntiles=good.ntiles - 1))
    with pytest.raises(AssertionError, match="dx elements"):
        short = dataclasses.replace(good, rows_per_chunk=good.rows_per_chunk - 1)
        model.check_tile_coverage(10, 600, 1, 1, short)


# --- The CUDA kernels ------------------------------------------------------------------------


def _has_cuda_kernels() -> bool:
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "metalcore::rmsnorm", "CUDA"
    )


needs_cuda = pytest.mark.skipif(not _has_cuda_kernels(), reason="needs a GPU and CUDA kernels")
DEV = "cuda"


def unaligned(t: torch.Tensor) -> torch.Tensor:
    """t on the GPU at a storage offset of one element: rows not 16-byte aligned (vectors of 1)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=DEV)
    v = buf[1:].view(t.shape)
    v.copy_(t)
    return v


def on_gpu(t, layout):
    if t is None:
        return None
    return unaligned(t) if layout == "offset" else t.to(DEV)


# Widths around each dtype's switch to the streaming plan: forward streams rows wider than 4096
# 16-byte vectors (bf16/fp16: 32768, fp32: 16384, fp64: 8192), backward wider than 1024 (8192,
# 4096, 2048); unaligned rows stream at every width.
FWD_WIDTHS = {
    torch.bfloat16: [32768, 32776, 65536, 65544],
    torch.float16: [32768, 32776, 40000],
    torch.float32: [16384, 16388, 40000],
    torch.float64: [8192, 8194, 12290],
}
BWD_WIDTHS = {
    torch.bfloat16: [8192, 8200, 12296, 65536],
    torch.float16: [8192, 8200, 40000],
    torch.float32: [4096, 4100, 16388],
    torch.float64: [2048, 2050, 8194],
}
UNALIGNED_WIDTHS = [7, 4095, 8199, 65537]


def _fwd_cases():
    for dtype, widths in FWD_WIDTHS.items():
        for n in widths:
            yield 129, n, dtype, "contiguous"
    for n in UNALIGNED_WIDTHS:
        yield 67, n, torch.bfloat16, "offset"
        yield 67, n, torch.float32, "offset"


def _bwd_cases():
    for dtype, widths in BWD_WIDTHS.items():
        for n in widths:
            yield 300, n, dtype, "contiguous"
    yield 2048, 65536, torch.bfloat16, "contiguous"  # the benchmark shape
    yield 1025, 65536, torch.float32, "contiguous"
    for n in UNALIGNED_WIDTHS:
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            yield 133, n, dtype, "offset"


def _id(c):
    return f"{c[0]}x{c[1]}-{str(c[2]).replace('torch.', '')}-{c[3]}"


@needs_cuda
@pytest.mark.parametrize("case", list(_fwd_cases()), ids=_id)
def test_forward(case):
    rows, n, dtype, layout = case
    t = inputs(rows, n, dtype, seed=n, residual=True)
    x = on_gpu(t["x"], layout)
    for w in (t["w"], None):
        wd = None if w is None else w.to(DEV)
        y = ops.rmsnorm(x, wd, EPS)
        y64 = ref.rmsnorm(t["x"].to(DEV).double(), None if w is None else wd.double(), EPS)
        assert_close(y, y64, dtype)
        # With a residual: the sum is rounded to dtype, then normalised.
        y, h = ops.fused_add_rmsnorm(x, on_gpu(t["r"], layout), wd, EPS)
        _, h_ref = ref.fused_add_rmsnorm(t["x"], t["r"], w, EPS)
        h_ref = h_ref.to(DEV)
        torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
        y64 = ref.rmsnorm(h_ref.double(), None if w is None else wd.double(), EPS)
        assert_close(y, y64, dtype)


@needs_cuda
@pytest.mark.parametrize("case", list(_bwd_cases()), ids=_id)
@pytest.mark.parametrize("with_w", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("with_gr", [False, True], ids=["", "grad_res"])
def test_backward(case, with_w, with_gr):
    rows, n, dtype, layout = case
    t = inputs(rows, n, dtype, seed=rows + n, weight=with_w, grad_res=with_gr)
    g, x, gr = on_gpu(t["g"], layout), on_gpu(t["x"], layout), on_gpu(t["gr"], layout)
    w = None if t["w"] is None else t["w"].to(DEV)
    if with_gr:
        dx, dw = ops.fused_add_rmsnorm_backward(g, gr, x, w, EPS)
    else:
        dx, dw = ops.rmsnorm_backward(g, x, w, EPS)
    dx64, dw64 = ref.rmsnorm_backward(g, x, w, EPS)  # float64 on the GPU
    if with_gr:
        dx64 = dx64 + gr.double()
    slack = DX_SLACK.get(dtype)
    assert_close(dx, dx64, dtype, rtol=slack, atol=slack)
    if with_w:
        tol = _dw_tol(dtype, rows)
        torch.testing.assert_close(dw.double(), dw64, rtol=tol, atol=tol)
        # Tighter where it is well defined: one rounding to dtype at the typical magnitude of
        # a sum of `rows` terms, plus fp32 accumulation.
        atol = TOL[dtype]["atol"] * rows**0.5
        torch.testing.assert_close(dw.double(), dw64, rtol=TOL[dtype]["rtol"], atol=atol)
    else:
        assert dw.shape == (0,)


@needs_cuda
@pytest.mark.parametrize("layout", ["contiguous", "offset"])
def test_backward_is_deterministic(layout):
    t = inputs(1000, 65536 if layout == "contiguous" else 12289, torch.bfloat16, seed=3)
    g, x, w = on_gpu(t["g"], layout), on_gpu(t["x"], layout), t["w"].to(DEV)
    first = ops.rmsnorm_backward(g, x, w, EPS)
    for _ in range(3):
        again = ops.rmsnorm_backward(g, x, w, EPS)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@needs_cuda
def test_autograd_matches_float64():
    t = inputs(256, 65536, torch.bfloat16, seed=5)
    x = t["x"].to(DEV).requires_grad_()
    w = t["w"].to(DEV).requires_grad_()
    y = torch.ops.metalcore.rmsnorm(x, w, EPS)
    y.backward(t["g"].to(DEV))
    dx64, dw64 = ref.rmsnorm_backward(t["g"].to(DEV), x.detach(), w.detach(), EPS)
    assert_close(x.grad, dx64, torch.bfloat16, rtol=DX_SLACK[torch.bfloat16], atol=0.05)
    tol = _dw_tol(torch.bfloat16, 256)
    torch.testing.assert_close(w.grad.double(), dw64, rtol=tol, atol=tol)


@needs_cuda
def test_cuda_graph_capture():
    # Three launches and a scratch allocation per backward: all capturable and replayable.
    t = inputs(96, 65536, torch.bfloat16, seed=7, residual=True)
    x, r, g, w = (t[k].to(DEV) for k in ("x", "r", "g", "w"))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.fused_add_rmsnorm(x, r, w, EPS)  # warm-up outside capture
        ops.rmsnorm_backward(g, x, w, EPS)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, h = ops.fused_add_rmsnorm(x, r, w, EPS)
        dx, dw = ops.rmsnorm_backward(g, h, w, EPS)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    y_ref, h_ref = ops.fused_add_rmsnorm(x, r, w, EPS)
    dx_ref, dw_ref = ops.rmsnorm_backward(g, h_ref, w, EPS)
    for a, b in ((y, y_ref), (h, h_ref), (dx, dx_ref), (dw, dw_ref)):
        assert torch.equal(a, b)


def _kernels_run(fn) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


WIDE_KERNELS = (
    "rmsnorm_fwd_wide_kernel",
    "rmsnorm_bwd_stats_kernel",
    "rmsnorm_bwd_tile_kernel",
    "rmsnorm_dw_reduce_kernel",
)


@needs_cuda
@pytest.mark.parametrize("layout", ["contiguous", "offset"])
def test_wide_row_kernels_run_when_enabled(layout):
    # The variable chooses the kernels of every streaming-plan row: wide aligned rows and
    # unaligned rows. Rows that fit registers keep their kernels either way.
    n = 65536 if layout == "contiguous" else 1000
    t = inputs(4, n, torch.bfloat16, seed=1)
    g, x, w = on_gpu(t["g"], layout), on_gpu(t["x"], layout), t["w"].to(DEV)

    def step():
        ops.rmsnorm(x, w, EPS)
        ops.rmsnorm_backward(g, x, w, EPS)

    names = " ".join(_kernels_run(step))
    for k in WIDE_KERNELS:
        assert (k in names) == WIDE_ROWS_ON, (k, names)
    assert ("rmsnorm_fwd_kernel" in names) != WIDE_ROWS_ON, names
    assert ("rmsnorm_bwd_kernel" in names) != WIDE_ROWS_ON, names

    narrow = inputs(4, 4096, torch.bfloat16, seed=2)
    xn, gn, wn = (narrow[k].to(DEV) for k in ("x", "g", "w"))
    names = " ".join(
        _kernels_run(lambda: (ops.rmsnorm(xn, wn, EPS), ops.rmsnorm_backward(gn, xn, wn, EPS)))
    )
    assert not any(k in names for k in WIDE_KERNELS), names


@needs_cuda
def test_bad_variable_value_raises():
    code = textwrap.dedent(
        """
        import torch, metalcore
        x = torch.randn(2, 65536, device="cuda")
        try:
            torch.ops.metalcore.rmsnorm(x, None, 1e-6)
        except ValueError as e:
            print("ERROR:", e)
        """
    )
    env = dict(os.environ, METALCORE_CUDA_WIDE_ROWS="yes", PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert "METALCORE_CUDA_WIDE_ROWS must be 0 or 1, got 'yes'" in out.stdout, out.stderr[-2000:]
