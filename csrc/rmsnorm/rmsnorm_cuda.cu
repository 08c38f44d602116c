// CUDA kernels of the RMSNorm family (the entry points with their validation are in
// rmsnorm_cuda.cpp, compiled by the host compiler). One block per row; the row stays in registers
// (K 16-byte vectors per thread) between the sum-of-squares pass and the output pass, so every
// input is read from memory once. Rows too wide for registers, or not 16-byte aligned, take a
// streaming path whose second pass re-reads the row (from L2 for all but the widest rows).
//
// Backward computes grad_input and grad_weight in one cooperative launch: a persistent grid
// walks the rows, each block keeps its grad_weight partial sums in shared memory, writes them as
// one fp32 row, then after a grid-wide barrier all blocks reduce the partial rows column-wise
// (deterministic: fixed order, no atomics).
//
// Rows on the streaming plan can take the wide-row kernels instead (section "Wide rows", opt-in
// with METALCORE_CUDA_WIDE_ROWS=1 until validated on a GPU): a forward whose re-read stays in L2
// and a backward of (row chunk x column slice) tiles that keeps grad_weight in registers.
#include <ATen/Dispatch.h>
#include <cooperative_groups.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "common/cuda_utils.cuh"
#include "rmsnorm/rmsnorm_cuda.h"

namespace metalcore {
namespace {

namespace cg = cooperative_groups;
using cuda::acc_t;
using cuda::Vec;

template <typename A>
__device__ __forceinline__ A rsqrt_acc(A v) {
  if constexpr (std::is_same_v<A, double>) {
    return 1.0 / sqrt(v);
  } else {
    return rsqrtf(v);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> ones() {
  Vec<T, VEC> o;
#pragma unroll
  for (int j = 0; j < VEC; ++j) o.v[j] = T(1);
  return o;
}

// x (and residual) rows have strides xs/rs; y and residual_out are contiguous [rows, n].
// K > 0: the row is cached in K vectors per thread; K == 0: streaming (two reads of the row).
template <typename T, int VEC, int K>
__global__ void __launch_bounds__(1024)
    rmsnorm_fwd_kernel(const T* __restrict__ x, int64_t xs, const T* __restrict__ r, int64_t rs,
                       const T* __restrict__ w, T* __restrict__ y, T* __restrict__ ro, int64_t rows,
                       int n, acc_t<T> eps) {
  using A = acc_t<T>;
  __shared__ A smem[32];
  const int nvec = n / VEC;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * xs;
    A ss[1] = {A(0)};
    if constexpr (K > 0) {
      Vec<T, VEC> xv[K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < nvec) {
          xv[k] = cuda::load_vec<T, VEC>(xr + i * VEC);
          if (r != nullptr) {
            // The sum is rounded to T before it is normalised, as the unfused code does.
            const Vec<T, VEC> rv = cuda::load_vec<T, VEC>(r + row * rs + i * VEC);
#pragma unroll
            for (int j = 0; j < VEC; ++j)
              xv[k].v[j] = T(static_cast<A>(xv[k].v[j]) + static_cast<A>(rv.v[j]));
            cuda::store_vec(ro + row * n + i * VEC, xv[k]);
          }
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const A v = static_cast<A>(xv[k].v[j]);
            ss[0] += v * v;
          }
        }
      }
      cuda::block_sum<A, 1>(ss, smem);
      const A rstd = rsqrt_acc(ss[0] / static_cast<A>(n) + eps);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < nvec) {
          const Vec<T, VEC> wv =
              w != nullptr ? cuda::load_vec<T, VEC>(w + i * VEC) : ones<T, VEC>();
          Vec<T, VEC> out;
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            out.v[j] = T(static_cast<A>(xv[k].v[j]) * rstd * static_cast<A>(wv.v[j]));
          cuda::store_vec(y + row * n + i * VEC, out);
        }
      }
    } else {
      for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
        Vec<T, VEC> xv = cuda::load_vec<T, VEC>(xr + i * VEC);
        if (r != nullptr) {
          const Vec<T, VEC> rv = cuda::load_vec<T, VEC>(r + row * rs + i * VEC);
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            xv.v[j] = T(static_cast<A>(xv.v[j]) + static_cast<A>(rv.v[j]));
          cuda::store_vec(ro + row * n + i * VEC, xv);
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const A v = static_cast<A>(xv.v[j]);
          ss[0] += v * v;
        }
      }
      cuda::block_sum<A, 1>(ss, smem);
      const A rstd = rsqrt_acc(ss[0] / static_cast<A>(n) + eps);
      // The second pass reads the rounded sum this thread wrote (same thread, same addresses).
      const T* src = r != nullptr ? ro + row * n : xr;
      for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
        const Vec<T, VEC> xv = cuda::load_vec<T, VEC>(src + i * VEC);
        const Vec<T, VEC> wv = w != nullptr ? cuda::load_vec<T, VEC>(w + i * VEC) : ones<T, VEC>();
        Vec<T, VEC> out;
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          out.v[j] = T(static_cast<A>(xv.v[j]) * rstd * static_cast<A>(wv.v[j]));
        cuda::store_vec(y + row * n + i * VEC, out);
      }
    }
  }
}

// dx = rstd * g * w - x * rstd^3 * sum(g * w * x) / n (+ grad_residual_out);
// dw = sum over rows of g * x * rstd. `partial` is [gridDim.x, n] in the accumulation type.
// At most 64 registers: two 512-thread or four 256-thread blocks per multiprocessor.
template <typename T, int VEC, int K>
__global__ void __launch_bounds__(512, 2)
    rmsnorm_bwd_kernel(const T* __restrict__ g, int64_t gs, const T* __restrict__ x, int64_t xs,
                       const T* __restrict__ w, const T* __restrict__ gr, int64_t grs,
                       T* __restrict__ dx, acc_t<T>* __restrict__ partial, T* __restrict__ dw,
                       int64_t rows, int n, acc_t<T> eps) {
  using A = acc_t<T>;
  __shared__ A smem[64];
  const int nvec = n / VEC;
  const bool has_w = w != nullptr;
  A* my_partial = partial + static_cast<int64_t>(blockIdx.x) * n;
  // grad_weight partial sums of this thread's columns live in shared memory (registers would
  // spill at four blocks per multiprocessor); the layout makes a warp's accesses conflict-free.
  extern __shared__ unsigned char dyn_smem[];
  A* dw_acc = reinterpret_cast<A*>(dyn_smem);
  const auto acc_at = [&](int k, int j) -> A& {
    return dw_acc[(k * VEC + j) * blockDim.x + threadIdx.x];
  };
  if constexpr (K > 0) {
    if (has_w) {
#pragma unroll
      for (int k = 0; k < K; ++k)
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc_at(k, j) = A(0);
    }
  } else if (has_w) {
    for (int i = threadIdx.x; i < nvec; i += blockDim.x)
#pragma unroll
      for (int j = 0; j < VEC; ++j) my_partial[i * VEC + j] = A(0);
  }

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * xs;
    const T* gp = g + row * gs;
    A s[2] = {A(0), A(0)};  // sum x^2, sum g * w * x
    if constexpr (K > 0) {
      Vec<T, VEC> xv[K], gv[K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < nvec) {
          xv[k] = cuda::load_vec<T, VEC>(xr + i * VEC);
          gv[k] = cuda::load_vec<T, VEC>(gp + i * VEC);
        }
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < nvec) {
          const Vec<T, VEC> wv = has_w ? cuda::load_vec<T, VEC>(w + i * VEC) : ones<T, VEC>();
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const A xa = static_cast<A>(xv[k].v[j]);
            s[0] += xa * xa;
            s[1] += static_cast<A>(gv[k].v[j]) * static_cast<A>(wv.v[j]) * xa;
          }
        }
      }
      cuda::block_sum<A, 2>(s, smem);
      const A rstd = rsqrt_acc(s[0] / static_cast<A>(n) + eps);
      const A c = s[1] * rstd * rstd * rstd / static_cast<A>(n);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < nvec) {
          const Vec<T, VEC> wv = has_w ? cuda::load_vec<T, VEC>(w + i * VEC) : ones<T, VEC>();
          Vec<T, VEC> grv;
          if (gr != nullptr) grv = cuda::load_vec<T, VEC>(gr + row * grs + i * VEC);
          Vec<T, VEC> out;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const A xa = static_cast<A>(xv[k].v[j]), ga = static_cast<A>(gv[k].v[j]);
            A d = rstd * ga * static_cast<A>(wv.v[j]) - xa * c;
            if (gr != nullptr) d += static_cast<A>(grv.v[j]);
            out.v[j] = T(d);
            if (has_w) acc_at(k, j) += ga * xa * rstd;
          }
          cuda::store_vec(dx + row * n + i * VEC, out);
        }
      }
    } else {
      for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
        const Vec<T, VEC> xv = cuda::load_vec<T, VEC>(xr + i * VEC);
        const Vec<T, VEC> gv = cuda::load_vec<T, VEC>(gp + i * VEC);
        const Vec<T, VEC> wv = has_w ? cuda::load_vec<T, VEC>(w + i * VEC) : ones<T, VEC>();
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const A xa = static_cast<A>(xv.v[j]);
          s[0] += xa * xa;
          s[1] += static_cast<A>(gv.v[j]) * static_cast<A>(wv.v[j]) * xa;
        }
      }
      cuda::block_sum<A, 2>(s, smem);
      const A rstd = rsqrt_acc(s[0] / static_cast<A>(n) + eps);
      const A c = s[1] * rstd * rstd * rstd / static_cast<A>(n);
      for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
        const Vec<T, VEC> xv = cuda::load_vec<T, VEC>(xr + i * VEC);
        const Vec<T, VEC> gv = cuda::load_vec<T, VEC>(gp + i * VEC);
        const Vec<T, VEC> wv = has_w ? cuda::load_vec<T, VEC>(w + i * VEC) : ones<T, VEC>();
        Vec<T, VEC> grv;
        if (gr != nullptr) grv = cuda::load_vec<T, VEC>(gr + row * grs + i * VEC);
        Vec<T, VEC> out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const A xa = static_cast<A>(xv.v[j]), ga = static_cast<A>(gv.v[j]);
          A d = rstd * ga * static_cast<A>(wv.v[j]) - xa * c;
          if (gr != nullptr) d += static_cast<A>(grv.v[j]);
          out.v[j] = T(d);
          if (has_w) my_partial[i * VEC + j] += ga * xa * rstd;
        }
        cuda::store_vec(dx + row * n + i * VEC, out);
      }
    }
  }
  if (!has_w) return;

  if constexpr (K > 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i < nvec) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) my_partial[i * VEC + j] = acc_at(k, j);
      }
    }
  }
  // Every block's partial row must be complete before any column is summed.
  __threadfence();
  cg::this_grid().sync();
  // Column sums of the [gridDim.x, n] partials: a block takes 32 columns (one per lane, coalesced),
  // its warps split the partial rows with 4 loads in flight each, then combine in shared memory.
  // Partial rows are few (a handful per multiprocessor) and L2-resident, so this is a few us.
  __shared__ A red[32][33];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int64_t nblocks = gridDim.x;
  for (int tile = blockIdx.x; tile * 32 < n; tile += gridDim.x) {
    const int c = tile * 32 + lane;
    A acc[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) acc[u] = A(0);
    if (c < n) {
      int64_t b = warp;
      for (; b + 3 * nw < nblocks; b += 4 * nw) {
#pragma unroll
        for (int u = 0; u < 4; ++u) acc[u] += __ldcg(partial + (b + u * nw) * n + c);
      }
      for (; b < nblocks; b += nw) acc[0] += __ldcg(partial + b * n + c);
    }
    red[warp][lane] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    __syncthreads();
    if (warp == 0 && c < n) {
      A tot = A(0);
      for (int w2 = 0; w2 < nw; ++w2) tot += red[w2][lane];
      dw[c] = T(tot);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Wide rows (opt-in: METALCORE_CUDA_WIDE_ROWS=1, see wide_rows_enabled). Rows that take the
// streaming plan above (too wide for registers, or not 16-byte aligned) are handled instead by:
//
//   forward: rmsnorm_fwd_wide_kernel, the streaming kernel on a persistent grid whose rows in
//     flight (one per block, at least one block per multiprocessor) fit in half of L2, so that
//     the second pass re-reads the row from L2, not DRAM.
//   backward, three launches, each pass over the data reading only what it needs:
//     1. rmsnorm_bwd_stats_kernel: per row rstd and c = sum(g * w * x) * rstd^3 / n (fp32).
//     2. rmsnorm_bwd_tile_kernel: (row chunk x column slice) tiles. A thread owns CPT vectors of
//        columns and walks the chunk's rows: it writes dx and keeps its grad_weight sums in
//        registers, then writes them once as the chunk's fp32 partial row.
//     3. rmsnorm_dw_reduce_kernel: grad_weight = column sums of the partial rows, fixed order.
//   That is 5 passes over [rows, n] (x and g twice, dx once) plus the partial rows (a few
//   percent), where the streaming backward re-read x and g and read-modified-wrote an fp32
//   partial row for every input row.
// All reductions have a fixed order for a given shape and device: results are deterministic.

// Loads and stores that bypass normal L2 retention (ld.global.cs / st.global.cs: evict first),
// for data touched once, so that it does not push out data about to be re-read.
template <int BYTES>
struct BitsOf;
template <>
struct BitsOf<16> {
  using type = int4;
};
template <>
struct BitsOf<8> {
  using type = long long;
};
template <>
struct BitsOf<4> {
  using type = int;
};
template <>
struct BitsOf<2> {
  using type = unsigned short;
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_once(const T* p) {
  using B = typename BitsOf<sizeof(Vec<T, VEC>)>::type;
  B b = __ldcs(reinterpret_cast<const B*>(p));
  return *reinterpret_cast<Vec<T, VEC>*>(&b);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_once(T* p, const Vec<T, VEC>& v) {
  using B = typename BitsOf<sizeof(Vec<T, VEC>)>::type;
  __stcs(reinterpret_cast<B*>(p), *reinterpret_cast<const B*>(&v));
}

// Element j of a vector in the accumulation type. bfloat16 widens by a shift of its packed
// 32-bit word (exact): with c10's per-element conversion the bfloat16 kernels below needed up to
// ~20 more registers than the float16 ones and spilled at 64.
template <typename T, int VEC>
__device__ __forceinline__ acc_t<T> elem(const Vec<T, VEC>& v, int j) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && VEC % 2 == 0) {
    const uint32_t w = reinterpret_cast<const uint32_t*>(&v)[j / 2];
    return __uint_as_float(j % 2 == 0 ? w << 16 : w & 0xffff0000u);
  } else {
    return static_cast<acc_t<T>>(v.v[j]);
  }
}

// Loop unrolls: U vectors (forward, statistics) or U rows (tiles) are loaded before any is used,
// so that each thread keeps several loads in flight. Halved for 8-byte types (registers).
template <typename T>
constexpr int wide_unroll() {
  return sizeof(T) == 8 ? 2 : 4;
}
// Rows per iteration of a backward tile (8-byte types: one; two spill at 64 registers on sm_80).
template <typename T>
constexpr int tile_rows() {
  return sizeof(T) == 8 ? 1 : 2;
}
// Block sizes. For 16-byte vectors (rows wider than the register plans hold) they are fixed, so
// the unrolled accesses are one base address plus constant offsets; unaligned rows (VEC == 1) of
// any width size the block to the row (kRowThreads: taken from blockDim).
constexpr int kFwdThreads = 1024;
constexpr int kStatsThreads = 512;
constexpr int kRowThreads = 0;
constexpr int kTileThreads = 256;
constexpr int kReduceWarps = 8;

template <int THREADS>
__device__ __forceinline__ int block_step() {
  if constexpr (THREADS > 0) {
    return THREADS;
  } else {
    return static_cast<int>(blockDim.x);
  }
}

// Pass 1 of the wide-row forward for one row: this thread's sum of squares over the vectors
// threadIdx.x, threadIdx.x + step, ... (in that order) of x, or, with a residual rr, of x + rr
// rounded to T (as the unfused code does), which is also stored to ror for pass 2.
template <typename T, int VEC, int U, int THREADS>
__device__ __forceinline__ acc_t<T> fwd_wide_sumsq(const T* __restrict__ xr,
                                                   const T* __restrict__ rr, T* __restrict__ ror,
                                                   int nvec) {
  using A = acc_t<T>;
  const int step = block_step<THREADS>();
  A ss = A(0);
// The unrolled body is the unit of loads in flight; unrolling the loop too would spill.
#pragma unroll 1
  for (int i0 = threadIdx.x; i0 < nvec; i0 += U * step) {
    Vec<T, VEC> xv[U];
    if (rr != nullptr) {
      Vec<T, VEC> rv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (i0 + u * step < nvec) {
          xv[u] = load_once<T, VEC>(xr + (i0 + u * step) * VEC);
          rv[u] = load_once<T, VEC>(rr + (i0 + u * step) * VEC);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (i0 + u * step < nvec) {
          Vec<T, VEC> sum;
#pragma unroll
          for (int j = 0; j < VEC; ++j) sum.v[j] = T(elem(xv[u], j) + elem(rv[u], j));
          xv[u] = sum;
          cuda::store_vec(ror + (i0 + u * step) * VEC, sum);
        }
      }
    } else {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (i0 + u * step < nvec) xv[u] = cuda::load_vec<T, VEC>(xr + (i0 + u * step) * VEC);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (i0 + u * step < nvec) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const A v = elem(xv[u], j);
          ss += v * v;
        }
      }
    }
  }
  return ss;
}

// Pass 2's loads of the wide-row forward: vectors i0, i0 + step, ... (U of them, those in the
// row) of the row (last use: evict-first) and of the weight (ones without one).
template <typename T, int VEC, int U>
__device__ __forceinline__ void fwd_wide_load(const T* __restrict__ src, const T* __restrict__ w,
                                              int i0, int step, int nvec, Vec<T, VEC> (&xv)[U],
                                              Vec<T, VEC> (&wv)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (i0 + u * step < nvec) {
      xv[u] = load_once<T, VEC>(src + (i0 + u * step) * VEC);
      wv[u] = w != nullptr ? cuda::load_vec<T, VEC>(w + (i0 + u * step) * VEC) : ones<T, VEC>();
    }
  }
}

// Forward for wide rows: same arithmetic as rmsnorm_fwd_kernel's streaming branch. Pass 1 reads
// x with the normal policy (it is read again in pass 2); pass 2 reads it for the last time and
// writes y, both evict-first. With a residual, pass 1 reads x and r once (evict-first) and
// stores the rounded sum, which pass 2 re-reads. Pass 1 of a plain row keeps
// wide_unroll<T>() loads in flight per thread; the two-stream loops keep two of each stream
// (more spills at 64 registers). RES (residual or not) is a template parameter: with both
// paths in one kernel, 16-byte vectors spill at 64 registers.
template <typename T, int VEC, int THREADS, bool RES>
__global__ void __launch_bounds__(1024, 1)
    rmsnorm_fwd_wide_kernel(const T* __restrict__ x, int64_t xs, const T* __restrict__ r,
                            int64_t rs, const T* __restrict__ w, T* __restrict__ y,
                            T* __restrict__ ro, int64_t rows, int n, acc_t<T> eps) {
  using A = acc_t<T>;
  constexpr int U = 2;
  __shared__ A smem[32];
  const int nvec = n / VEC;
  const int step = block_step<THREADS>();
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * xs;
    T* ror = RES ? ro + row * n : nullptr;
    T* yr = y + row * n;
    A ss[1];
    if constexpr (RES) {
      ss[0] = fwd_wide_sumsq<T, VEC, U, THREADS>(xr, r + row * rs, ror, nvec);
    } else {
      ss[0] = fwd_wide_sumsq<T, VEC, wide_unroll<T>(), THREADS>(xr, nullptr, nullptr, nvec);
    }
    // Pass 2's first loads do not depend on rstd: issued before the barrier, they keep this
    // multiprocessor's memory busy while the block sums (one block per multiprocessor here).
    const T* src = RES ? ror : xr;
    Vec<T, VEC> xv[U], wv[U];
    fwd_wide_load<T, VEC, U>(src, w, threadIdx.x, step, nvec, xv, wv);
    cuda::block_sum<A, 1>(ss, smem);
    const A rstd = rsqrt_acc(ss[0] / static_cast<A>(n) + eps);
// The unrolled body is the unit of loads in flight; unrolling the loop too would spill.
#pragma unroll 1
    for (int i0 = threadIdx.x; i0 < nvec; i0 += U * step) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (i0 + u * step < nvec) {
          Vec<T, VEC> out;
#pragma unroll
          for (int j = 0; j < VEC; ++j) out.v[j] = T(elem(xv[u], j) * rstd * elem(wv[u], j));
          store_once<T, VEC>(yr + (i0 + u * step) * VEC, out);
        }
      }
      fwd_wide_load<T, VEC, U>(src, w, i0 + U * step, step, nvec, xv, wv);
    }
  }
}

// Backward pass 1: stats[2 * row] = rstd, stats[2 * row + 1] = c = sum(g * w * x) * rstd^3 / n.
// A thread sums the vectors threadIdx.x, threadIdx.x + blockDim.x, ... in that order, then the
// block combines the threads (cuda::block_sum).
template <typename T, int VEC, int THREADS>
__global__ void __launch_bounds__(512, 2)
    rmsnorm_bwd_stats_kernel(const T* __restrict__ g, int64_t gs, const T* __restrict__ x,
                             int64_t xs, const T* __restrict__ w, int64_t rows, int n, acc_t<T> eps,
                             acc_t<T>* __restrict__ stats) {
  using A = acc_t<T>;
  constexpr int U = wide_unroll<T>();
  __shared__ A smem[64];
  const int nvec = n / VEC;
  const int step = block_step<THREADS>();
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * xs;
    const T* gp = g + row * gs;
    A s[2] = {A(0), A(0)};  // sum x^2, sum g * w * x
// The unrolled body is the unit of loads in flight; unrolling the loop too would spill.
#pragma unroll 1
    for (int i0 = threadIdx.x; i0 < nvec; i0 += U * step) {
      Vec<T, VEC> xv[U], gv[U], wv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (i0 + u * step < nvec) {
          xv[u] = load_once<T, VEC>(xr + (i0 + u * step) * VEC);
          gv[u] = load_once<T, VEC>(gp + (i0 + u * step) * VEC);
          wv[u] = w != nullptr ? cuda::load_vec<T, VEC>(w + (i0 + u * step) * VEC) : ones<T, VEC>();
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (i0 + u * step < nvec) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const A xa = elem(xv[u], j);
            s[0] += xa * xa;
            s[1] += elem(gv[u], j) * elem(wv[u], j) * xa;
          }
        }
      }
    }
    cuda::block_sum<A, 2>(s, smem);
    if (threadIdx.x == 0) {
      const A rstd = rsqrt_acc(s[0] / static_cast<A>(n) + eps);
      stats[2 * row] = rstd;
      stats[2 * row + 1] = s[1] * rstd * rstd * rstd / static_cast<A>(n);
    }
  }
}

// Backward pass 2 over tiles t = chunk * nslices + slice (adjacent blocks take adjacent slices of
// the same rows). Rows [chunk * rows_per_chunk, +rows_per_chunk) clipped to `rows`; a thread's
// vectors of columns are slice * CPT * kTileThreads + k * kTileThreads + threadIdx.x, k < CPT
// (coalesced for every k). dx = rstd * g * w - x * c (+ grad_residual_out), as in
// rmsnorm_bwd_kernel; partial[chunk, col] = the sum of g * x * rstd over the chunk's rows, in
// row order. At most 64 registers: four blocks per multiprocessor.
template <typename T, int VEC, int CPT>
__global__ void __launch_bounds__(kTileThreads, 4)
    rmsnorm_bwd_tile_kernel(const T* __restrict__ g, int64_t gs, const T* __restrict__ x,
                            int64_t xs, const T* __restrict__ w, const T* __restrict__ gr,
                            int64_t grs, const acc_t<T>* __restrict__ stats, T* __restrict__ dx,
                            acc_t<T>* __restrict__ partial, int64_t rows, int n,
                            int64_t rows_per_chunk, int64_t nslices, int64_t ntiles) {
  using A = acc_t<T>;
  constexpr int U = tile_rows<T>();
  constexpr int KSTEP = kTileThreads * VEC;  // elements between a thread's vectors
  const int nvec = n / VEC;
  const bool has_w = w != nullptr;
  for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x) {
    const int64_t chunk = t / nslices;
    const int64_t slice = t - chunk * nslices;
    const int64_t r0 = chunk * rows_per_chunk;
    const int64_t r1 = std::min<int64_t>(rows, r0 + rows_per_chunk);
    const int64_t first = slice * CPT * kTileThreads + threadIdx.x;
    if (first >= nvec) continue;  // no barrier below: idle threads may leave the tile
    const int c0 = static_cast<int>(first) * VEC;
    bool on[CPT];
    Vec<T, VEC> wv[CPT];
    A acc[CPT][VEC];
#pragma unroll
    for (int k = 0; k < CPT; ++k) {
      on[k] = first + k * kTileThreads < nvec;
      wv[k] = has_w && on[k] ? cuda::load_vec<T, VEC>(w + c0 + k * KSTEP) : ones<T, VEC>();
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[k][j] = A(0);
    }
// U rows per iteration are the unit of loads in flight (unrolling further would spill).
#pragma unroll 1
    for (int64_t row0 = r0; row0 < r1; row0 += U) {
      Vec<T, VEC> xv[U][CPT], gv[U][CPT], grv[U][CPT];
      A rstd[U], c[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t row = row0 + u;
        if (row < r1) {
          rstd[u] = stats[2 * row];
          c[u] = stats[2 * row + 1];
          const T* xr = x + row * xs + c0;
          const T* gp = g + row * gs + c0;
#pragma unroll
          for (int k = 0; k < CPT; ++k) {
            if (on[k]) {
              xv[u][k] = load_once<T, VEC>(xr + k * KSTEP);
              gv[u][k] = load_once<T, VEC>(gp + k * KSTEP);
              if (gr != nullptr) grv[u][k] = load_once<T, VEC>(gr + row * grs + c0 + k * KSTEP);
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t row = row0 + u;
        if (row < r1) {
          T* dxr = dx + row * n + c0;
#pragma unroll
          for (int k = 0; k < CPT; ++k) {
            if (on[k]) {
              Vec<T, VEC> out;
#pragma unroll
              for (int j = 0; j < VEC; ++j) {
                const A xa = elem(xv[u][k], j), ga = elem(gv[u][k], j);
                A d = rstd[u] * ga * elem(wv[k], j) - xa * c[u];
                if (gr != nullptr) d += elem(grv[u][k], j);
                out.v[j] = T(d);
                if (has_w) acc[k][j] += ga * xa * rstd[u];
              }
              store_once<T, VEC>(dxr + k * KSTEP, out);
            }
          }
        }
      }
    }
    if (has_w) {
      // Normal stores: the reduce kernel reads the partial rows next, from L2.
      A* pr = partial + chunk * n + c0;
#pragma unroll
      for (int k = 0; k < CPT; ++k) {
        if (on[k]) {
          Vec<A, VEC> p;
#pragma unroll
          for (int j = 0; j < VEC; ++j) p.v[j] = acc[k][j];
          cuda::store_vec(pr + k * KSTEP, p);
        }
      }
    }
  }
}

// Backward pass 3: dw[c] = sum over chunks of partial[chunk, c]. A block takes 32 columns (one
// per lane: each warp load is one 128-byte line); warp q sums chunks q, q + 8, q + 16, ... in
// that order, then warp 0 adds the eight warp sums in warp order.
template <typename T>
__global__ void __launch_bounds__(32 * kReduceWarps)
    rmsnorm_dw_reduce_kernel(const acc_t<T>* __restrict__ partial, int64_t nchunks, int n,
                             T* __restrict__ dw) {
  using A = acc_t<T>;
  __shared__ A red[kReduceWarps][33];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  A acc = A(0);
  if (c < n) {
#pragma unroll 4
    for (int64_t k = warp; k < nchunks; k += kReduceWarps) acc += partial[k * n + c];
  }
  red[warp][lane] = acc;
  __syncthreads();
  if (warp == 0 && c < n) {
    A tot = red[0][lane];
#pragma unroll
    for (int q = 1; q < kReduceWarps; ++q) tot += red[q][lane];
    dw[c] = T(tot);
  }
}

// ---------------------------------------------------------------------------------------------
// Launch configuration.

struct RowPlan {
  int vec;      // elements per access: 16 / sizeof(T), or 1 for unaligned rows
  int k;        // vectors cached per thread, 0 = streaming
  int threads;  // block size, a multiple of 32
};

int round_warp(int64_t t) { return static_cast<int>(std::max<int64_t>(32, (t + 31) / 32 * 32)); }

// Smallest K in {1, 2, 4} (up to max_k) whose block stays within `target` threads, else the
// largest K that fits `cap` threads, else streaming with `target` threads.
RowPlan plan_rows(int64_t n, int vec, int max_k, int target, int cap) {
  const int64_t nvec = n / vec;
  for (int k = 1; k <= max_k; k *= 2) {
    if (cuda::ceil_div(nvec, k) <= target) return {vec, k, round_warp(cuda::ceil_div(nvec, k))};
    // Two vectors a thread with up to 512 threads beats four with 256 (8192-wide bf16 rows).
    if (k == 2 && cuda::ceil_div(nvec, k) <= 512 && cap >= 512) {
      return {vec, k, round_warp(cuda::ceil_div(nvec, k))};
    }
  }
  if (cuda::ceil_div(nvec, max_k) <= cap) {
    return {vec, max_k, round_warp(cuda::ceil_div(nvec, max_k))};
  }
  return {vec, 0, target};
}

template <typename T>
int pick_vec(int64_t n, std::initializer_list<std::pair<const void*, int64_t>> rows) {
  constexpr int V = cuda::vec_width<T>();
  if (n % V != 0) return 1;
  for (const auto& [p, stride] : rows) {
    if (p != nullptr && (!cuda::aligned16(p) || (stride * static_cast<int64_t>(sizeof(T))) % 16))
      return 1;
  }
  return V;
}

// Calls f(std::integral_constant<int, VEC>, std::integral_constant<int, K>) for a plan; only
// K <= MaxK is instantiated.
template <typename T, int MaxK, typename F>
void with_plan(const RowPlan& p, F&& f) {
  constexpr int V = cuda::vec_width<T>();
  using std::integral_constant;
  if (p.vec == 1) return f(integral_constant<int, 1>(), integral_constant<int, 0>());
  if (p.k == 1) return f(integral_constant<int, V>(), integral_constant<int, 1>());
  if (p.k == 2) return f(integral_constant<int, V>(), integral_constant<int, 2>());
  if constexpr (MaxK >= 4) {
    if (p.k == 4) return f(integral_constant<int, V>(), integral_constant<int, 4>());
  }
  return f(integral_constant<int, V>(), integral_constant<int, 0>());
}

// Co-resident blocks per multiprocessor for a kernel at a block size, cached (the query costs
// microseconds, the launch budget is a few).
int max_blocks_per_sm(const void* kernel, int threads, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, size_t>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, threads, smem);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
  cache[key] = blocks;
  return blocks;
}

// Whether rows on the streaming plan take the wide-row kernels. The environment variable
// METALCORE_CUDA_WIDE_ROWS=1 turns them on, =0 off; unset or empty, kWideRowsDefault decides
// (off until they are validated on a GPU; tests/cuda/test_rmsnorm_wide_rows.py states the same
// default). Read once per process, so every call in a process takes the same kernels.
constexpr bool kWideRowsDefault = false;

bool wide_rows_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("METALCORE_CUDA_WIDE_ROWS");
    if (v == nullptr || v[0] == '\0') return kWideRowsDefault;
    TORCH_CHECK_VALUE(std::strcmp(v, "0") == 0 || std::strcmp(v, "1") == 0,
                      "metalcore: the environment variable METALCORE_CUDA_WIDE_ROWS must be 0 or "
                      "1, got '",
                      v, "'");
    return v[0] == '1';
  }();
  return on;
}

// Rows the wide-row kernels take: those the kernels above stream (K == 0, and every unaligned
// row: with_plan runs vectors of 1 streaming whatever K says), up to a length that leaves the
// wide kernels' 32-bit index arithmetic (a vector index plus a few block strides) headroom.
bool use_wide_rows(const RowPlan& plan, int64_t n) {
  return (plan.k == 0 || plan.vec == 1) && n <= INT32_MAX - (int64_t{1} << 16) &&
         wide_rows_enabled();
}

// L2 size of the current device, read once per device.
int64_t l2_bytes() {
  static int cached[64] = {0};
  const int dev = c10::cuda::current_device();
  if (dev < 64 && cached[dev] > 0) return cached[dev];
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrL2CacheSize, dev));
  if (dev < 64) cached[dev] = bytes;
  return bytes;
}

template <typename T, int VEC>
void forward_wide(const T* xp, int64_t xs, const T* rp, int64_t rs, const T* wp, T* yp, T* rop,
                  int64_t rows, int64_t n, double eps, cudaStream_t stream) {
  constexpr int THREADS = VEC > 1 ? kFwdThreads : kRowThreads;
  auto kernel = rp != nullptr ? rmsnorm_fwd_wide_kernel<T, VEC, THREADS, true>
                              : rmsnorm_fwd_wide_kernel<T, VEC, THREADS, false>;
  const int64_t nvec = n / VEC;
  const int threads =
      THREADS > 0 ? THREADS : std::min(1024, round_warp(cuda::ceil_div(nvec, wide_unroll<T>())));
  const int per_sm = max_blocks_per_sm(reinterpret_cast<const void*>(kernel), threads, 0);
  // Each block has one row in flight, read once from DRAM and again (pass 2) from L2. The rows in
  // flight must stay in L2 meanwhile: they get half of it (the writes of y and the weight pass
  // through L2 too, and its replacement is not exact LRU).
  const int64_t row_bytes = n * static_cast<int64_t>(sizeof(T));
  const int64_t fit = std::max<int64_t>(1, l2_bytes() / 2 / row_bytes / cuda::sm_count());
  const int64_t blocks = std::min<int64_t>(std::max(per_sm, 1), fit) * cuda::sm_count();
  const auto grid = static_cast<unsigned>(std::min<int64_t>(rows, blocks));
  kernel<<<grid, threads, 0, stream>>>(xp, xs, rp, rs, wp, yp, rop, rows, static_cast<int>(n),
                                       static_cast<acc_t<T>>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct TilePlan {
  int64_t rows_per_chunk;
  int64_t nchunks;
  int64_t nslices;
  int64_t ntiles;
};

// Fixed cost of a tile (block start, weight and statistics loads, partial-row store, the tail of
// its last loads), in the time of one of its rows: keeps tiles from shrinking to a few rows.
constexpr int64_t kTileStartRows = 8;

// Row chunks of the backward tiles. Fewer chunks mean fewer fp32 partial rows to write and read
// back; more chunks mean more tiles to spread over the multiprocessors. The plan minimises, in
// units of the time a wave of `resident` tiles takes per row,
//   ceil(tiles / resident) * (rows_per_chunk + kTileStartRows)
//     + 2 * nchunks * partial_row_bytes / (resident * tile_row_bytes)
// over chunk sizes of powers of two and of whole waves (1-8) of chunks; ties go to fewer chunks.
// bench/studies/rmsnorm_wide_rows_model.py mirrors this function.
TilePlan plan_tiles(int64_t rows, int64_t nslices, int64_t resident, int64_t tile_row_bytes,
                    int64_t partial_row_bytes) {
  resident = std::max<int64_t>(resident, 1);
  std::vector<int64_t> sizes;
  for (int64_t r = 1; r < 2 * rows; r *= 2) sizes.push_back(std::min(r, rows));
  const int64_t per_wave = std::max<int64_t>(1, resident / nslices);
  for (int64_t m = 1; m <= 8; ++m) sizes.push_back(cuda::ceil_div(rows, m * per_wave));
  TilePlan best{rows, 1, nslices, nslices};
  double best_cost = -1;
  for (const int64_t size : sizes) {
    const int64_t chunks = cuda::ceil_div(rows, size);
    const int64_t waves = cuda::ceil_div(chunks * nslices, resident);
    const double cost = static_cast<double>(waves) * static_cast<double>(size + kTileStartRows) +
                        2.0 * static_cast<double>(chunks) * static_cast<double>(partial_row_bytes) /
                            (static_cast<double>(resident) * static_cast<double>(tile_row_bytes));
    if (best_cost < 0 || cost < best_cost || (cost == best_cost && chunks < best.nchunks)) {
      best_cost = cost;
      best = {size, chunks, nslices, chunks * nslices};
    }
  }
  return best;
}

// Vectors of columns per tile thread: one 16-byte vector, or four scalars for unaligned rows of
// 2- and 4-byte types, so that each thread keeps more than a few bytes in flight (8-byte
// scalars: one, more spill at 64 registers).
template <typename T, int VEC>
constexpr int tile_cpt() {
  return VEC > 1 || sizeof(T) == 8 ? 1 : 4;
}

template <typename T, int VEC>
void backward_wide(const T* gp, int64_t gs, const T* xp, int64_t xs, const T* wp, const T* grp,
                   int64_t grs, T* dxp, T* dwp, int64_t rows, int64_t n, double eps,
                   const at::TensorOptions& opts, cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int CPT = tile_cpt<T, VEC>();
  constexpr int STATS_THREADS = VEC > 1 ? kStatsThreads : kRowThreads;
  const int64_t nvec = n / VEC;
  const int n32 = static_cast<int>(n);
  const A eps_a = static_cast<A>(eps);
  auto tile_kernel = rmsnorm_bwd_tile_kernel<T, VEC, CPT>;
  const int64_t resident = static_cast<int64_t>(max_blocks_per_sm(
                               reinterpret_cast<const void*>(tile_kernel), kTileThreads, 0)) *
                           cuda::sm_count();
  const int64_t nslices = cuda::ceil_div(nvec, static_cast<int64_t>(CPT) * kTileThreads);
  const int64_t tile_row_bytes = static_cast<int64_t>(CPT) * kTileThreads * VEC *
                                 static_cast<int64_t>(sizeof(T)) * (grp != nullptr ? 4 : 3);
  const int64_t partial_row_bytes = wp != nullptr ? n * static_cast<int64_t>(sizeof(A)) : 0;
  const TilePlan plan = plan_tiles(rows, nslices, resident, tile_row_bytes, partial_row_bytes);

  // One allocation: the partial rows [nchunks, n] (if any) first, so that their vector stores
  // are aligned, then the row statistics [rows, 2].
  const int64_t partial_elems = wp != nullptr ? plan.nchunks * n : 0;
  at::Tensor scratch =
      at::empty({partial_elems + 2 * rows}, opts.dtype(c10::CppTypeToScalarType<A>()));
  A* partial = scratch.mutable_data_ptr<A>();
  A* stats = partial + partial_elems;

  const int stats_threads = STATS_THREADS > 0
                                ? STATS_THREADS
                                : std::min(512, round_warp(cuda::ceil_div(nvec, wide_unroll<T>())));
  const auto stats_grid = static_cast<unsigned>(std::min<int64_t>(rows, INT32_MAX));
  rmsnorm_bwd_stats_kernel<T, VEC, STATS_THREADS>
      <<<stats_grid, stats_threads, 0, stream>>>(gp, gs, xp, xs, wp, rows, n32, eps_a, stats);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const auto tile_grid = static_cast<unsigned>(std::min<int64_t>(plan.ntiles, INT32_MAX));
  tile_kernel<<<tile_grid, kTileThreads, 0, stream>>>(gp, gs, xp, xs, wp, grp, grs, stats, dxp,
                                                      partial, rows, n32, plan.rows_per_chunk,
                                                      plan.nslices, plan.ntiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (wp != nullptr) {
    const auto reduce_grid = static_cast<unsigned>(cuda::ceil_div(n, 32));
    rmsnorm_dw_reduce_kernel<T>
        <<<reduce_grid, 32 * kReduceWarps, 0, stream>>>(partial, plan.nchunks, n32, dwp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

namespace cuda {

void launch_forward(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                    double eps, const at::Tensor& out, const at::Tensor& residual_out) {
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(n <= INT32_MAX, "metalcore.rmsnorm: rows longer than 2^31 are not supported");
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rmsnorm_cuda", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    const T* rp = residual.defined() ? residual.const_data_ptr<T>() : nullptr;
    const T* wp = weight.defined() ? weight.const_data_ptr<T>() : nullptr;
    T* yp = out.mutable_data_ptr<T>();
    T* rop = residual_out.defined() ? residual_out.mutable_data_ptr<T>() : nullptr;
    const int64_t xs = x.stride(0), rs = rp ? residual.stride(0) : 0;
    const int vec = pick_vec<T>(n, {{xp, xs}, {rp, rs}, {wp, 0}, {yp, n}, {rop, n}});
    const RowPlan plan = plan_rows(n, vec, 4, 256, 1024);
    if (use_wide_rows(plan, n)) {
      constexpr int V = cuda::vec_width<T>();
      if (vec == V) {
        forward_wide<T, V>(xp, xs, rp, rs, wp, yp, rop, rows, n, eps, stream);
      } else {
        forward_wide<T, 1>(xp, xs, rp, rs, wp, yp, rop, rows, n, eps, stream);
      }
      return;
    }
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>(rows, INT32_MAX));
    with_plan<T, 4>(plan, [&](auto v, auto k) {
      rmsnorm_fwd_kernel<T, decltype(v)::value, decltype(k)::value>
          <<<grid, plan.threads, 0, stream>>>(xp, xs, rp, rs, wp, yp, rop, rows,
                                              static_cast<int>(n), static_cast<acc_t<T>>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void launch_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& grad_res, double eps, const at::Tensor& dx,
                     const at::Tensor& dw) {
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(n <= INT32_MAX,
              "metalcore.rmsnorm_backward: rows longer than 2^31 are not supported");
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "rmsnorm_bwd_cuda", [&] {
        using T = scalar_t;
        using A = acc_t<T>;
        const T* gp = g.const_data_ptr<T>();
        const T* xp = x.const_data_ptr<T>();
        const T* wp = weight.defined() ? weight.const_data_ptr<T>() : nullptr;
        const T* grp = grad_res.defined() ? grad_res.const_data_ptr<T>() : nullptr;
        T* dxp = dx.mutable_data_ptr<T>();
        T* dwp = weight.defined() ? dw.mutable_data_ptr<T>() : nullptr;
        const int64_t gs = g.stride(0), xs = x.stride(0), grs = grp ? grad_res.stride(0) : 0;
        const int vec = pick_vec<T>(n, {{gp, gs}, {xp, xs}, {wp, 0}, {grp, grs}, {dxp, n}});
        const RowPlan plan = plan_rows(n, vec, 2, 256, 512);
        if (use_wide_rows(plan, n)) {
          constexpr int V = cuda::vec_width<T>();
          if (vec == V) {
            backward_wide<T, V>(gp, gs, xp, xs, wp, grp, grs, dxp, dwp, rows, n, eps, x.options(),
                                stream);
          } else {
            backward_wide<T, 1>(gp, gs, xp, xs, wp, grp, grs, dxp, dwp, rows, n, eps, x.options(),
                                stream);
          }
          return;
        }
        with_plan<T, 2>(plan, [&](auto v, auto k) {
          auto kernel = rmsnorm_bwd_kernel<T, decltype(v)::value, decltype(k)::value>;
          // Persistent grid: every block must be resident for the grid-wide barrier.
          const size_t smem = wp != nullptr && plan.k > 0 ? static_cast<size_t>(plan.k) * plan.vec *
                                                                plan.threads * sizeof(A)
                                                          : 0;
          const int per_sm =
              max_blocks_per_sm(reinterpret_cast<const void*>(kernel), plan.threads, smem);
          TORCH_CHECK(per_sm > 0, "metalcore.rmsnorm_backward: kernel does not fit on the device");
          // About 1024 threads per multiprocessor keep enough loads in flight; more blocks would
          // only add partial rows to the grad_weight reduction.
          const int cap = std::max(1, std::min(per_sm, 1024 / plan.threads));
          const int64_t resident = static_cast<int64_t>(cap) * cuda::sm_count();
          const int grid = static_cast<int>(std::min<int64_t>(rows, resident));
          at::Tensor partial =
              wp != nullptr ? at::empty({grid, n}, x.options().dtype(c10::CppTypeToScalarType<A>()))
                            : at::Tensor();
          A* pp = partial.defined() ? partial.mutable_data_ptr<A>() : nullptr;
          int n32 = static_cast<int>(n);
          A eps_a = static_cast<A>(eps);
          void* args[] = {&gp,
                          const_cast<int64_t*>(&gs),
                          &xp,
                          const_cast<int64_t*>(&xs),
                          &wp,
                          &grp,
                          const_cast<int64_t*>(&grs),
                          &dxp,
                          &pp,
                          &dwp,
                          const_cast<int64_t*>(&rows),
                          &n32,
                          &eps_a};
          C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid,
                                                     plan.threads, args, smem, stream));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
}

}  // namespace cuda
}  // namespace metalcore
