// CUDA kernels of the cross-entropy family: one block per row. Each thread keeps an online
// (max, sum of exp) pair and the sum of its logits over a strided walk of the row, the block
// merges them; the forward then writes the row's loss, the backward walks the row once more
// (from L2) writing the gradient. Ignored rows write 0.
#include <ATen/Dispatch.h>

#include <cmath>
#include <limits>

#include "common/cuda_utils.cuh"
#include "cross_entropy/cross_entropy_cuda.h"

namespace metalcore {
namespace {

using cuda::acc_t;
using cuda::exp_acc;
using cuda::log_acc;

constexpr int kThreads = 512;

// Online (max, sum of exp(x - max), sum of x). -inf logits add nothing to the exp sum (skipped,
// so a leading -inf cannot make it exp(-inf + inf) = NaN); a NaN logit makes it NaN.
template <typename A>
struct Stats {
  A m, s, sx;
};

template <typename A>
__device__ __forceinline__ void push(Stats<A>& st, A x) {
  st.sx += x;
  if (x == -std::numeric_limits<A>::infinity()) return;
  if (x > st.m) {
    st.s = st.s * exp_acc(st.m - x) + A(1);
    st.m = x;
  } else {
    st.s += exp_acc(x - st.m);
  }
}

template <typename A>
__device__ __forceinline__ Stats<A> merge(Stats<A> a, Stats<A> b) {
  const A m = a.m > b.m ? a.m : b.m;
  const A ninf = -std::numeric_limits<A>::infinity();
  const A sa = a.m == ninf ? A(0) : a.s * exp_acc(a.m - m);
  const A sb = b.m == ninf ? A(0) : b.s * exp_acc(b.m - m);
  return {m, sa + sb, a.sx + b.sx};
}

template <typename A>
__device__ __forceinline__ Stats<A> warp_merge(Stats<A> st) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Stats<A> other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s, o),
                   __shfl_xor_sync(0xffffffffu, st.sx, o)};
    st = merge(st, other);
  }
  return st;
}

// The row's stats, in every thread. A +inf max gives a NaN sum (torch: exp(inf - inf)).
template <typename T>
__device__ Stats<acc_t<T>> row_stats(const T* __restrict__ xr, int64_t n) {
  using A = acc_t<T>;
  __shared__ A sm[32], ss[32], sx[32];
  Stats<A> st{-std::numeric_limits<A>::infinity(), A(0), A(0)};
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) push(st, static_cast<A>(xr[j]));
  st = warp_merge(st);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  if (lane == 0) {
    sm[warp] = st.m;
    ss[warp] = st.s;
    sx[warp] = st.sx;
  }
  __syncthreads();
  Stats<A> t{lane < nwarps ? sm[lane] : -std::numeric_limits<A>::infinity(),
             lane < nwarps ? ss[lane] : A(0), lane < nwarps ? sx[lane] : A(0)};
  t = warp_merge(t);
  if (t.m == std::numeric_limits<A>::infinity()) t.s = A(NAN);
  return t;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ce_forward_kernel(const T* __restrict__ x, int64_t xs, const int64_t* __restrict__ target,
                      int64_t n, int64_t ignore_index, acc_t<T> eps,
                      acc_t<T>* __restrict__ losses) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const int64_t t = target[row];
  if (t == ignore_index) {
    if (threadIdx.x == 0) losses[row] = A(0);
    return;
  }
  const T* xr = x + row * xs;
  const Stats<A> st = row_stats(xr, n);
  if (threadIdx.x != 0) return;
  const A log_sum = log_acc(st.s);
  A loss = (A(1) - eps) * (log_sum + (st.m - static_cast<A>(xr[t])));
  if (eps > A(0)) loss += eps * (log_sum + (st.m - st.sx / static_cast<A>(n)));
  losses[row] = loss;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ce_backward_kernel(const acc_t<T>* __restrict__ scale, const T* __restrict__ x, int64_t xs,
                       const int64_t* __restrict__ target, int64_t n, int64_t ignore_index,
                       acc_t<T> eps, T* __restrict__ grad) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const int64_t t = target[row];
  T* gr = grad + row * n;
  if (t == ignore_index) {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) gr[j] = T(0);
    return;
  }
  const T* xr = x + row * xs;
  const Stats<A> st = row_stats(xr, n);
  const A s = scale[row];
  // (softmax - eps / C - (1 - eps) onehot) * scale, the scale last as in the formula.
  const A inv = A(1) / st.s, u = eps / static_cast<A>(n), on = A(1) - eps;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const A p = exp_acc(static_cast<A>(xr[j]) - st.m) * inv;
    gr[j] = static_cast<T>((p - (j == t ? on : A(0)) - u) * s);
  }
}

int row_threads(int64_t n) {
  int t = 32;
  while (t < kThreads && t < n) t *= 2;
  return t;
}

}  // namespace

namespace cuda {

void launch_cross_entropy_forward(const at::Tensor& x, const at::Tensor& target,
                                  int64_t ignore_index, double smoothing,
                                  const at::Tensor& losses) {
  const int64_t rows = x.size(0), n = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_cuda", [&] {
        using A = acc_t<scalar_t>;
        ce_forward_kernel<scalar_t>
            <<<static_cast<unsigned>(rows), row_threads(n), 0, current_stream()>>>(
                x.const_data_ptr<scalar_t>(), x.stride(0), target.const_data_ptr<int64_t>(), n,
                ignore_index, static_cast<A>(smoothing), losses.mutable_data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void launch_cross_entropy_backward(const at::Tensor& scale, const at::Tensor& x,
                                   const at::Tensor& target, int64_t ignore_index, double smoothing,
                                   const at::Tensor& grad_in) {
  const int64_t rows = x.size(0), n = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_backward_cuda", [&] {
        using A = acc_t<scalar_t>;
        ce_backward_kernel<scalar_t>
            <<<static_cast<unsigned>(rows), row_threads(n), 0, current_stream()>>>(
                scale.const_data_ptr<A>(), x.const_data_ptr<scalar_t>(), x.stride(0),
                target.const_data_ptr<int64_t>(), n, ignore_index, static_cast<A>(smoothing),
                grad_in.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace cuda
}  // namespace metalcore
