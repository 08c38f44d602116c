"""A CPU model of the wide-row RMSNorm CUDA kernels (the "Wide rows" section of
csrc/rmsnorm/rmsnorm_cuda.cu, opt-in with METALCORE_CUDA_WIDE_ROWS=1): the same block sizes, tile
plan and index arithmetic, and every fp32 accumulation in the kernels' order, so that their
numerics can be checked against float64 without a GPU.

What is exact and what is not:
- Every sum is accumulated in the kernels' order: per thread over its vectors threadIdx.x,
  threadIdx.x + blockDim.x, ... and their elements in order; across a warp by the xor butterfly
  of cuda::warp_sum; across warps as cuda::block_sum does; grad_weight over the rows of a chunk in
  row order, then over chunks as rmsnorm_dw_reduce_kernel does (warp q: chunks q, q + 8, ...).
- Multiply-adds that nvcc contracts by default (``s += a * b``) are fused multiply-adds here
  (computed in float64, rounded once to float32; float64 holds the product of two float32
  values exactly). The GPU's rsqrtf (approximate, a few ulp) is modelled as a correctly rounded
  1 / sqrt, and nvcc's choice of which products of ``rstd * g * w - x * c`` it fuses is modelled
  as one: both differ from the GPU by an ulp or so of fp32, far below the outputs' rounding.
- Coverage: the tile loops are replayed with the kernel's index arithmetic, and every element
  of dx and of each partial row must be written exactly once (ragged edges included).

Run as a script to print the errors of a few shapes against float64 (the tests in
tests/cuda/test_rmsnorm_wide_rows.py assert them):

    PYTHONPATH=. python bench/studies/rmsnorm_wide_rows_model.py
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metalcore.testing import reference as ref

# Constants of the kernels (csrc/rmsnorm/rmsnorm_cuda.cu).
FWD_THREADS = 1024  # rmsnorm_fwd_wide_kernel, 16-byte vectors
STATS_THREADS = 512  # rmsnorm_bwd_stats_kernel, 16-byte vectors
TILE_THREADS = 256  # rmsnorm_bwd_tile_kernel
TILE_START_ROWS = 8  # kTileStartRows of the tile plan's cost
REDUCE_WARPS = 8  # rmsnorm_dw_reduce_kernel


def vec_width(dtype: torch.dtype) -> int:
    """Elements per 16-byte vector."""
    return 128 // torch.finfo(dtype).bits


def wide_unroll(dtype: torch.dtype) -> int:
    return 2 if dtype == torch.float64 else 4


def round_warp(t: int) -> int:
    return max(32, (t + 31) // 32 * 32)


def fwd_threads(n: int, vec: int, dtype: torch.dtype) -> int:
    """forward_wide's block size."""
    return FWD_THREADS if vec > 1 else min(1024, round_warp(-(-(n // vec) // wide_unroll(dtype))))


def stats_threads(n: int, vec: int, dtype: torch.dtype) -> int:
    """backward_wide's block size for the statistics kernel."""
    return STATS_THREADS if vec > 1 else min(512, round_warp(-(-(n // vec) // wide_unroll(dtype))))


def tile_cpt(vec: int, dtype: torch.dtype) -> int:
    """Vectors of columns per tile thread (tile_cpt)."""
    return 1 if vec > 1 or dtype == torch.float64 else 4


@dataclass(frozen=True)
class TilePlan:
    rows_per_chunk: int
    nchunks: int
    nslices: int
    ntiles: int


def plan_tiles(
    rows: int, nslices: int, resident: int, tile_row_bytes: int, partial_row_bytes: int
) -> TilePlan:
    """The C++ plan_tiles, line for line."""
    resident = max(resident, 1)
    sizes = []
    r = 1
    while r < 2 * rows:
        sizes.append(min(r, rows))
        r *= 2
    per_wave = max(1, resident // nslices)
    sizes += [-(-rows // (m * per_wave)) for m in range(1, 9)]
    best, best_cost = TilePlan(rows, 1, nslices, nslices), -1.0
    for size in sizes:
        chunks = -(-rows // size)
        waves = -(-(chunks * nslices) // resident)
        cost = float(waves) * float(size + TILE_START_ROWS) + 2.0 * float(chunks) * float(
            partial_row_bytes
        ) / (float(resident) * float(tile_row_bytes))
        if best_cost < 0 or cost < best_cost or (cost == best_cost and chunks < best.nchunks):
            best_cost = cost
            best = TilePlan(size, chunks, nslices, chunks * nslices)
    return best


def backward_plan(
    rows: int, n: int, dtype: torch.dtype, vec: int, resident: int, has_w: bool, has_gr: bool
) -> TilePlan:
    """backward_wide's tile plan for ``resident`` co-resident tile blocks on the device."""
    cpt = tile_cpt(vec, dtype)
    nslices = -(-(n // vec) // (cpt * TILE_THREADS))
    es = torch.finfo(dtype).bits // 8
    tile_row_bytes = cpt * TILE_THREADS * vec * es * (4 if has_gr else 3)
    acc_bytes = 8 if dtype == torch.float64 else 4
    return plan_tiles(rows, nslices, resident, tile_row_bytes, n * acc_bytes if has_w else 0)


# --- fp32 arithmetic -------------------------------------------------------------------------


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a * b + c rounded once to a's dtype (float32: via float64, which holds a * b exactly;
    float64 inputs: the model's fp64 path, with a * b rounded first)."""
    if a.dtype == torch.float64:
        return a * b + c
    return (a.double() * b.double() + c.double()).to(a.dtype)


def warp_sum(v: torch.Tensor) -> torch.Tensor:
    """cuda::warp_sum over the last dim (32 lanes): v += shfl_xor(v, o) for o = 16 .. 1. Lanes
    i and i ^ o add the same two values, so every lane ends with one value; lane 0's is
    returned."""
    lanes = torch.arange(32)
    for o in (16, 8, 4, 2, 1):
        v = v + v[..., lanes ^ o]
    return v[..., 0]


def block_sum(v: torch.Tensor) -> torch.Tensor:
    """cuda::block_sum of per-thread values [..., threads] (threads a multiple of 32)."""
    nwarps = v.shape[-1] // 32
    w = warp_sum(v.reshape(*v.shape[:-1], nwarps, 32))
    if nwarps == 1:
        return w[..., 0]
    t = torch.zeros(*v.shape[:-1], 32, dtype=v.dtype)
    t[..., :nwarps] = w
    return warp_sum(t)


def thread_order(n: int, vec: int, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element indices [steps, threads] in the order each thread visits them (vector threadIdx.x
    + m * threads for m = 0, 1, ..., its elements in order), and which are in the row."""
    nvec = n // vec
    steps = -(-nvec // threads)
    vi = torch.arange(steps)[:, None] * threads + torch.arange(threads)[None, :]
    idx = (vi[:, None, :] * vec + torch.arange(vec)[None, :, None]).reshape(steps * vec, threads)
    valid = (vi < nvec).repeat_interleave(vec, dim=0)
    return idx.clamp(max=n - 1), valid


def thread_sums(pairs, n: int, vec: int, threads: int) -> list[torch.Tensor]:
    """Per-row block sums of a * b over the row, for each (a, b) pair of [rows, n] tensors in the
    accumulation type, as the kernels accumulate them: each thread ``s += a * b`` (fused) over
    its elements in order, then cuda::block_sum. Elements past the row add a * b = 0 here, which
    leaves the sum unchanged (s + 0 == s), as the kernels' skipped iterations do."""
    idx, valid = thread_order(n, vec, threads)
    sums = []
    for a, b in pairs:
        # [rows, steps, threads], in each thread's order, zero past the row.
        ao = torch.where(valid, a[:, idx], 0)
        bo = torch.where(valid, b[:, idx], 0)
        if a.dtype == torch.float32:
            ao, bo = ao.double(), bo.double()
        s = torch.zeros(a.shape[0], threads, dtype=a.dtype)
        for step in range(idx.shape[0]):
            s = fma_wide(ao[:, step], bo[:, step], s)
        sums.append(block_sum(s))
    return sums


def fma_wide(a64: torch.Tensor, b64: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fma for a and b already widened to float64 (float32 model), or float64 itself."""
    if c.dtype == torch.float64:
        return a64 * b64 + c
    return (a64 * b64 + c.double()).float()


def rsqrt(v: torch.Tensor) -> torch.Tensor:
    return (1.0 / v.double().sqrt()).to(v.dtype)


# --- the kernels -----------------------------------------------------------------------------


def forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    vec: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """rmsnorm_fwd_wide_kernel on [rows, n] inputs: (y, residual_out or None). ``vec``: 16-byte
    vectors (default) or 1 (unaligned rows)."""
    dtype = x.dtype
    acc = acc_dtype(dtype)
    rows, n = x.shape
    vec = vec_width(dtype) if vec is None else vec
    threads = fwd_threads(n, vec, dtype)
    h = x
    if residual is not None:
        h = (x.to(acc) + residual.to(acc)).to(dtype)  # rounded to T, as the unfused code
    ha = h.to(acc)
    (ss,) = thread_sums([(ha, ha)], n, vec, threads)
    rstd = rsqrt(ss / n + eps)
    w = torch.ones(n, dtype=acc) if weight is None else weight.to(acc)
    y = ((ha * rstd[:, None]) * w).to(dtype)
    return y, (h if residual is not None else None)


def backward_stats(g, x, weight, eps, *, vec):
    """rmsnorm_bwd_stats_kernel: (rstd, c) per row."""
    dtype = x.dtype
    acc = acc_dtype(dtype)
    rows, n = x.shape
    xa, ga = x.to(acc), g.to(acc)
    w = torch.ones(n, dtype=acc) if weight is None else weight.to(acc)
    threads = stats_threads(n, vec, dtype)
    # s1 += (g * w) * x: the product g * w is rounded, then fused with the add.
    s0, s1 = thread_sums([(xa, xa), (ga * w, xa)], n, vec, threads)
    rstd = rsqrt(s0 / n + eps)
    c = s1 * rstd * rstd * rstd / n
    return rstd, c


def backward(
    g: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    grad_residual: torch.Tensor | None = None,
    *,
    resident: int = 4 * 132,
    vec: int | None = None,
    check_coverage: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, TilePlan]:
    """The three backward kernels on [rows, n]: (dx, dw or None, the tile plan). ``resident``:
    co-resident tile blocks on the modelled device (H100: 4 per multiprocessor x 132)."""
    dtype = x.dtype
    acc = acc_dtype(dtype)
    rows, n = x.shape
    vec = vec_width(dtype) if vec is None else vec
    has_w = weight is not None
    rstd, c = backward_stats(g, x, weight, eps, vec=vec)
    plan = backward_plan(rows, n, dtype, vec, resident, has_w, grad_residual is not None)
    if check_coverage:
        check_tile_coverage(rows, n, vec, tile_cpt(vec, dtype), plan)

    xa, ga = x.to(acc), g.to(acc)
    w = torch.ones(n, dtype=acc) if weight is None else weight.to(acc)
    # dx is elementwise in the statistics: the tiling does not change it.
    d = fma(-xa, c[:, None].expand_as(xa), (rstd[:, None] * ga) * w)
    if grad_residual is not None:
        d = d + grad_residual.to(acc)
    dx = d.to(dtype)
    if not has_w:
        return dx, None, plan
    # Partial rows: per chunk, the chunk's rows in order (acc += (g * x) * rstd, fused).
    partial = torch.zeros(plan.nchunks, n, dtype=acc)
    gx = ga * xa
    for k in range(plan.nchunks):
        for row in range(k * plan.rows_per_chunk, min(rows, (k + 1) * plan.rows_per_chunk)):
            partial[k] = fma(gx[row], rstd[row].expand(n), partial[k])
    # Reduce: warp q sums chunks q, q + 8, ... in order; then the warp sums in warp order.
    red = torch.zeros(REDUCE_WARPS, n, dtype=acc)
    for q in range(REDUCE_WARPS):
        for k in range(q, plan.nchunks, REDUCE_WARPS):
            red[q] = red[q] + partial[k]
    tot = red[0]
    for q in range(1, REDUCE_WARPS):
        tot = tot + red[q]
    return dx, tot.to(dtype), plan


def check_tile_coverage(rows: int, n: int, vec: int, cpt: int, plan: TilePlan) -> None:
    """Replays rmsnorm_bwd_tile_kernel's index arithmetic over all tiles and threads and raises
    unless every dx element and every partial-row element is written exactly once."""
    nvec = n // vec
    dx_count = torch.zeros(rows, n, dtype=torch.int32)
    part_count = torch.zeros(plan.nchunks, n, dtype=torch.int32)
    tid = torch.arange(TILE_THREADS)
    for t in range(plan.ntiles):
        chunk, slc = divmod(t, plan.nslices)
        r0 = chunk * plan.rows_per_chunk
        r1 = min(rows, r0 + plan.rows_per_chunk)
        first = slc * cpt * TILE_THREADS + tid
        live = first < nvec  # threads past the row leave the tile
        for k in range(cpt):
            on = live & (first + k * TILE_THREADS < nvec)
            c0 = (first[on] + k * TILE_THREADS) * vec
            cols = (c0[:, None] + torch.arange(vec)[None, :]).reshape(-1)
            once = torch.ones(cols.numel(), dtype=torch.int32)
            dx_count[r0:r1].index_add_(1, cols, once.expand(r1 - r0, -1))
            part_count[chunk].index_add_(0, cols, once)
    if not bool((dx_count == 1).all()):
        bad = (dx_count != 1).nonzero()[:5].tolist()
        raise AssertionError(f"dx elements not written exactly once, e.g. [row, col] {bad}")
    if not bool((part_count == 1).all()):
        bad = (part_count != 1).nonzero()[:5].tolist()
        raise AssertionError(f"partial elements not written exactly once, e.g. {bad}")
    covered = plan.nchunks * plan.rows_per_chunk
    if covered < rows or covered - plan.rows_per_chunk >= rows:
        raise AssertionError(f"chunks do not cover the rows exactly: {plan}, rows {rows}")


# --- errors against float64 ------------------------------------------------------------------


def max_errors(rows: int, n: int, dtype: torch.dtype, seed: int = 0, **kw) -> dict:
    """Largest errors of the model against float64, relative to the largest reference value."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=gen).to(dtype)
    g = torch.randn(rows, n, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(n, generator=gen)).to(dtype)
    y, _ = forward(x, w, 1e-6, vec=kw.get("vec"))
    dx, dw, plan = backward(g, x, w, 1e-6, **kw)
    y64 = ref.rmsnorm(x.double(), w.double(), 1e-6)
    dx64, dw64 = ref.rmsnorm_backward(g, x, w, 1e-6)

    def rel(a, b):
        return float((a.double() - b).abs().max() / b.abs().max())

    return {"y": rel(y, y64), "dx": rel(dx, dx64), "dw": rel(dw, dw64), "plan": plan}


if __name__ == "__main__":
    torch.set_num_threads(1)  # many small steps: threads cost more than they give on a busy CPU
    cases = [
        (256, 65536, torch.bfloat16, {}),
        (300, 40000, torch.float32, {}),
        (77, 12296, torch.float16, {"resident": 16}),
        (129, 4095, torch.bfloat16, {"vec": 1, "resident": 24}),
    ]
    for rows, n, dtype, kw in cases:
        e = max_errors(rows, n, dtype, **kw)
        p = e.pop("plan")
        ulp = torch.finfo(dtype).eps
        print(
            f"{rows:5d} x {n:6d} {str(dtype):15s} "
            f"chunks {p.nchunks:3d} x {p.rows_per_chunk:4d} rows, "
            f"slices {p.nslices:3d}: max error / max |ref|: "
            + ", ".join(f"{k} {v:.2e}" for k, v in e.items())
            + f" (one {dtype} ulp at 1: {ulp:.1e})"
        )
