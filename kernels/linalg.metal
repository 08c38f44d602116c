// Batched small dense linear algebra, float32 (the Metal backend's compute dtype: 16-bit inputs
// are upcast by the host, and Metal has no double).
//
// Cholesky: one threadgroup per matrix, right-looking: at step j every thread reads the pivot,
// the column below it is divided by its square root, and the trailing lower triangle takes the
// rank-1 update, its (n - j)^2 / 2 entries spread over the threadgroup. A matrix of order up to
// kTileMaxN lives in threadgroup memory for the whole factorization (one read of A, one write of
// L); a larger one is factored in place in L's device memory, correct at any order but bound by
// device-memory traffic. A pivot that is not a positive finite number stops the factorization
// with info = its 1-based order (LAPACK's spotrf) and a factor of NaN, as the CPU kernel gives.
//
// Triangular solve (A X = B, A lower or upper, optionally unit diagonal): one simdgroup per
// right-hand-side column, substitution over rows; the lanes split each row's dot product and
// simd_sum joins it, so every lane holds x_i and lane i % 32 stores it. A lane later reads back
// only the x_j it stored itself (j % 32 == lane), so no barrier is needed between rows.
#include <metal_stdlib>

#include "linalg.h"

using namespace metal;
using metalcore::linalg_k::kTileMaxN;
using metalcore::linalg_k::Params;

// Barriers order both address spaces: the device-memory variant's updates must be visible to the
// threadgroup's other threads after each one.
#define METALCORE_LINALG_BARRIER() \
  threadgroup_barrier(mem_flags::mem_threadgroup | mem_flags::mem_device)

// Factors the lower triangle of the n x n row-major matrix m in place (the strict upper triangle
// is never read or written). Returns 0 or the failing pivot's 1-based order; uniform across the
// threadgroup (every thread reads the same pivot after a barrier).
template <typename M>
inline uint cholesky_in_place(M m, uint n, uint tid, uint tpg) {
  for (uint j = 0; j < n; ++j) {
    METALCORE_LINALG_BARRIER();
    const float d = m[j * n + j];
    if (!(d > 0.0f && d < INFINITY)) return j + 1;
    const float ljj = sqrt(d);
    METALCORE_LINALG_BARRIER();  // every thread has read the pivot before it is overwritten
    for (uint i = j + tid; i < n; i += tpg) m[i * n + j] = i == j ? ljj : m[i * n + j] / ljj;
    METALCORE_LINALG_BARRIER();
    // Trailing update of the lower triangle: entry (i, c) for j < c <= i < n.
    const uint r = n - j - 1;
    for (uint t = tid; t < r * r; t += tpg) {
      const uint i = j + 1 + t / r, c = j + 1 + t % r;
      if (c <= i) m[i * n + c] -= m[i * n + j] * m[c * n + j];
    }
  }
  METALCORE_LINALG_BARRIER();
  return 0;
}

// L = the factor (strict upper triangle zero), or all NaN on failure; info[b] as above.
inline void cholesky_finish(device float* l, device int* info, uint n, uint fail, uint tid,
                            uint tpg, uint b) {
  // A failed factorization returned right after reading its pivot: let every thread have read
  // it before the NaN fill overwrites it (in place in L for the device-memory variant).
  METALCORE_LINALG_BARRIER();
  for (uint t = tid; t < n * n; t += tpg) {
    if (fail != 0) {
      l[t] = NAN;
    } else if (t % n > t / n) {
      l[t] = 0.0f;
    }
  }
  if (tid == 0) info[b] = int(fail);
}

[[kernel]] void linalg_cholesky_tile_float32(device const float* a [[buffer(0)]],
                                             device float* l [[buffer(1)]],
                                             device int* info [[buffer(2)]],
                                             constant Params& p [[buffer(3)]],
                                             uint b [[threadgroup_position_in_grid]],
                                             uint tid [[thread_index_in_threadgroup]],
                                             uint tpg [[threads_per_threadgroup]]) {
  threadgroup float m[kTileMaxN * kTileMaxN];
  const uint n = p.n;
  device const float* ab = a + ulong(b) * n * n;
  device float* lb = l + ulong(b) * n * n;
  for (uint t = tid; t < n * n; t += tpg) {
    if (t % n <= t / n) m[t] = ab[t];  // the lower triangle only: the rest may be anything
  }
  const uint fail = cholesky_in_place(m, n, tid, tpg);
  for (uint t = tid; t < n * n; t += tpg) {
    if (t % n <= t / n) lb[t] = m[t];
  }
  cholesky_finish(lb, info, n, fail, tid, tpg, b);
}

[[kernel]] void linalg_cholesky_device_float32(device const float* a [[buffer(0)]],
                                               device float* l [[buffer(1)]],
                                               device int* info [[buffer(2)]],
                                               constant Params& p [[buffer(3)]],
                                               uint b [[threadgroup_position_in_grid]],
                                               uint tid [[thread_index_in_threadgroup]],
                                               uint tpg [[threads_per_threadgroup]]) {
  const uint n = p.n;
  device const float* ab = a + ulong(b) * n * n;
  device float* lb = l + ulong(b) * n * n;
  for (uint t = tid; t < n * n; t += tpg) {
    if (t % n <= t / n) lb[t] = ab[t];
  }
  const uint fail = cholesky_in_place(lb, n, tid, tpg);
  cholesky_finish(lb, info, n, fail, tid, tpg, b);
}

// Threadgroup (matrix b, block of kTrsmColumns columns); simdgroup sg solves column c.
[[kernel]] void linalg_trsm_float32(device const float* a [[buffer(0)]],
                                    device const float* bm [[buffer(1)]],
                                    device float* x [[buffer(2)]], constant Params& p [[buffer(3)]],
                                    uint2 tg [[threadgroup_position_in_grid]],
                                    uint lane [[thread_index_in_simdgroup]],
                                    uint sg [[simdgroup_index_in_threadgroup]],
                                    uint n_sg [[simdgroups_per_threadgroup]]) {
  const uint n = p.n, k = p.k, b = tg.y;
  const uint c = tg.x * n_sg + sg;
  if (c >= k) return;  // a whole simdgroup leaves: no barrier follows
  device const float* ab = a + ulong(b) * n * n;
  device const float* bb = bm + ulong(b) * n * k;
  device float* xb = x + ulong(b) * n * k;
  for (uint s = 0; s < n; ++s) {
    const uint i = p.upper != 0 ? n - 1 - s : s;
    // sum over the already solved j (j < i lower, j > i upper) of a[i, j] x[j]: lane l takes
    // j = l, l + 32, ..., each an x_j it stored itself.
    float part = 0.0f;
    if (p.upper != 0) {
      for (uint j = lane; j < n; j += 32) {
        if (j > i) part = fma(ab[i * n + j], xb[ulong(j) * k + c], part);
      }
    } else {
      for (uint j = lane; j < i; j += 32) part = fma(ab[i * n + j], xb[ulong(j) * k + c], part);
    }
    float xi = bb[ulong(i) * k + c] - simd_sum(part);
    if (p.unit == 0) xi /= ab[i * n + i];
    if (i % 32 == lane) xb[ulong(i) * k + c] = xi;
  }
}
