// CUDA kernels of the softmax family. Rows (inner == 1): one block per row; each thread keeps an
// online (max, sum of exp) pair over its elements, the block merges the pairs, and a second pass
// writes the row (re-read from L2), so the row is read from memory once. Softmax over an inner
// dim (inner > 1): one thread per (outer, inner) column, whose loads are coalesced across inner.
// Backward: a block (or thread) sum of g * y (softmax) or g (log_softmax), then one write pass.
#include <ATen/Dispatch.h>

#include <cmath>
#include <limits>

#include "common/cuda_utils.cuh"
#include "softmax/softmax_cuda.h"

namespace metalcore {
namespace {

using cuda::acc_t;
using cuda::exp_acc;
using cuda::log_acc;

constexpr int kThreads = 512;

// Online softmax state: the running max m and the sum s of exp(x - m). -inf elements add
// nothing (skipping them keeps a leading -inf from turning s into exp(-inf + inf) = NaN); NaN
// elements make s NaN.
template <typename A>
struct MaxSum {
  A m, s;
};

template <typename A>
__device__ __forceinline__ void push(MaxSum<A>& st, A x) {
  if (x == -std::numeric_limits<A>::infinity()) return;
  if (x > st.m) {
    st.s = st.s * exp_acc(st.m - x) + A(1);
    st.m = x;
  } else {
    st.s += exp_acc(x - st.m);
  }
}

template <typename A>
__device__ __forceinline__ MaxSum<A> merge(MaxSum<A> a, MaxSum<A> b) {
  const A m = a.m > b.m ? a.m : b.m;
  const A ninf = -std::numeric_limits<A>::infinity();
  const A sa = a.m == ninf ? A(0) : a.s * exp_acc(a.m - m);
  const A sb = b.m == ninf ? A(0) : b.s * exp_acc(b.m - m);
  return {m, sa + sb};
}

// A +inf max leaves every other element at exp(-inf) = 0 and its own at exp(inf - inf): torch
// gives NaN for the whole row, so does this.
template <typename A>
__device__ __forceinline__ A final_sum(const MaxSum<A>& st) {
  return st.m == std::numeric_limits<A>::infinity() ? A(NAN) : st.s;
}

template <typename A>
__device__ __forceinline__ MaxSum<A> warp_merge(MaxSum<A> st) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum<A> other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s, o)};
    st = merge(st, other);
  }
  return st;
}

template <typename A>
__device__ MaxSum<A> block_merge(MaxSum<A> st) {
  __shared__ A sm[32], ss[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  st = warp_merge(st);
  if (lane == 0) {
    sm[warp] = st.m;
    ss[warp] = st.s;
  }
  __syncthreads();
  MaxSum<A> t{lane < nwarps ? sm[lane] : -std::numeric_limits<A>::infinity(),
              lane < nwarps ? ss[lane] : A(0)};
  return warp_merge(t);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    softmax_rows_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n, bool log) {
  using A = acc_t<T>;
  const T* xr = x + blockIdx.x * n;
  T* yr = y + blockIdx.x * n;
  MaxSum<A> st{-std::numeric_limits<A>::infinity(), A(0)};
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) push(st, static_cast<A>(xr[j]));
  st = block_merge(st);
  const A sum = final_sum(st);
  const A ls = log_acc(sum), inv = A(1) / sum;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const A d = static_cast<A>(xr[j]) - st.m;
    yr[j] = static_cast<T>(log ? d - ls : exp_acc(d) * inv);
  }
}

template <typename T>
__global__ void softmax_columns_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t outer,
                                       int64_t n, int64_t inner, bool log) {
  using A = acc_t<T>;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= outer * inner) return;
  const int64_t base = (col / inner) * n * inner + col % inner;
  MaxSum<A> st{-std::numeric_limits<A>::infinity(), A(0)};
  for (int64_t k = 0; k < n; ++k) push(st, static_cast<A>(x[base + k * inner]));
  const A sum = final_sum(st);
  const A ls = log_acc(sum), inv = A(1) / sum;
  for (int64_t k = 0; k < n; ++k) {
    const A d = static_cast<A>(x[base + k * inner]) - st.m;
    y[base + k * inner] = static_cast<T>(log ? d - ls : exp_acc(d) * inv);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    softmax_backward_rows_kernel(const T* __restrict__ g, const T* __restrict__ y,
                                 T* __restrict__ dx, int64_t n, bool log) {
  using A = acc_t<T>;
  __shared__ A smem[32];
  const int64_t off = static_cast<int64_t>(blockIdx.x) * n;
  A v[1] = {A(0)};
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const A gj = static_cast<A>(g[off + j]);
    v[0] += log ? gj : gj * static_cast<A>(y[off + j]);
  }
  cuda::block_sum<A, 1>(v, smem);
  const A s = v[0];
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const A gj = static_cast<A>(g[off + j]), yj = static_cast<A>(y[off + j]);
    dx[off + j] = static_cast<T>(log ? gj - exp_acc(yj) * s : yj * (gj - s));
  }
}

template <typename T>
__global__ void softmax_backward_columns_kernel(const T* __restrict__ g, const T* __restrict__ y,
                                                T* __restrict__ dx, int64_t outer, int64_t n,
                                                int64_t inner, bool log) {
  using A = acc_t<T>;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= outer * inner) return;
  const int64_t base = (col / inner) * n * inner + col % inner;
  A s = A(0);
  for (int64_t k = 0; k < n; ++k) {
    const A gk = static_cast<A>(g[base + k * inner]);
    s += log ? gk : gk * static_cast<A>(y[base + k * inner]);
  }
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = base + k * inner;
    const A gk = static_cast<A>(g[i]), yk = static_cast<A>(y[i]);
    dx[i] = static_cast<T>(log ? gk - exp_acc(yk) * s : yk * (gk - s));
  }
}

int row_threads(int64_t n) {
  int t = 32;
  while (t < kThreads && t < n) t *= 2;
  return t;
}

}  // namespace

namespace cuda {

void launch_softmax_forward(const at::Tensor& x, bool log, const at::Tensor& out) {
  const int64_t outer = x.size(0), n = x.size(1), inner = x.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_cuda", [&] {
    const auto* xp = x.const_data_ptr<scalar_t>();
    auto* yp = out.mutable_data_ptr<scalar_t>();
    if (inner == 1) {
      softmax_rows_kernel<scalar_t>
          <<<static_cast<unsigned>(outer), row_threads(n), 0, current_stream()>>>(xp, yp, n, log);
    } else {
      const int64_t cols = outer * inner;
      softmax_columns_kernel<scalar_t>
          <<<static_cast<unsigned>(ceil_div(cols, 256)), 256, 0, current_stream()>>>(xp, yp, outer,
                                                                                     n, inner, log);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_softmax_backward(const at::Tensor& grad_out, const at::Tensor& y, bool log,
                             const at::Tensor& grad_in) {
  const int64_t outer = y.size(0), n = y.size(1), inner = y.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, y.scalar_type(), "softmax_backward_cuda", [&] {
        const auto* gp = grad_out.const_data_ptr<scalar_t>();
        const auto* yp = y.const_data_ptr<scalar_t>();
        auto* dp = grad_in.mutable_data_ptr<scalar_t>();
        if (inner == 1) {
          softmax_backward_rows_kernel<scalar_t>
              <<<static_cast<unsigned>(outer), row_threads(n), 0, current_stream()>>>(gp, yp, dp, n,
                                                                                      log);
        } else {
          const int64_t cols = outer * inner;
          softmax_backward_columns_kernel<scalar_t>
              <<<static_cast<unsigned>(ceil_div(cols, 256)), 256, 0, current_stream()>>>(
                  gp, yp, dp, outer, n, inner, log);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace cuda
}  // namespace metalcore
