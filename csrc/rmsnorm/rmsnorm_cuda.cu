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
#include <ATen/Dispatch.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <tuple>
#include <utility>

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
