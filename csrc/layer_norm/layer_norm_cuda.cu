// CUDA kernels of the LayerNorm family (the entry points with their validation are in
// layer_norm_cuda.cpp, compiled by the host compiler). A first, correctness-first version that
// mirrors the Metal kernels: one block per row in the forward, threads striding over the row
// (coalesced scalar loads; later passes re-read the row from L1/L2); the backward walks blocks
// of rows per CUDA block, keeps grad_weight / grad_bias partials per block as one fp32 row owned
// column-wise by its threads, and a second kernel reduces the partial rows in a fixed order
// (deterministic: no atomics). Statistics are the corrected two-pass ones of the CPU kernels.
#include <ATen/Dispatch.h>

#include <algorithm>

#include "common/cuda_utils.cuh"
#include "layer_norm/layer_norm_cuda.h"

namespace metalcore {
namespace {

using cuda::acc_t;

constexpr int kThreads = 256;
constexpr int64_t kMaxGroups = 1024;
constexpr int64_t kMinRowsPerGroup = 8;

template <typename A>
__device__ __forceinline__ A rsqrt_acc(A v) {
  if constexpr (std::is_same_v<A, double>) {
    return 1.0 / sqrt(v);
  } else {
    return rsqrtf(v);
  }
}

template <typename A>
__device__ __forceinline__ bool finite_acc(A v) {
  return isfinite(v);
}

// x (and residual) rows have strides xs/rs; y and residual_out are contiguous [rows, n].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    layer_norm_fwd_kernel(const T* __restrict__ x, int64_t xs, const T* __restrict__ r, int64_t rs,
                          const T* __restrict__ w, const T* __restrict__ b, T* __restrict__ y,
                          T* __restrict__ ro, int n, acc_t<T> eps) {
  using A = acc_t<T>;
  __shared__ A smem[2 * 32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * xs;
  T* yr = y + row * n;
  const T* src = xr;
  if (r != nullptr) {
    // Rounded to T once, as unfused code would; every later loop gives a thread the same
    // columns, so it re-reads only what it wrote itself.
    const T* rr = r + row * rs;
    T* hr = ro + row * n;
    for (int j = threadIdx.x; j < n; j += blockDim.x) hr[j] = T(A(xr[j]) + A(rr[j]));
    src = hr;
  }
  A s[1] = {A(0)};
  for (int j = threadIdx.x; j < n; j += blockDim.x) s[0] += A(src[j]);
  cuda::block_sum<A, 1>(s, smem);
  const A mean0 = s[0] / A(n);
  A q[2] = {A(0), A(0)};  // sum d, sum d^2 with d = x - mean0
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const A d = A(src[j]) - mean0;
    q[0] += d;
    q[1] += d * d;
  }
  cuda::block_sum<A, 2>(q, smem);
  const A delta = q[0] / A(n);
  const A var = max(q[1] / A(n) - delta * delta, A(0));
  const A mean = mean0 + delta, rstd = rsqrt_acc(var + eps);
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    A v = (A(src[j]) - mean) * rstd;
    if (w != nullptr) v *= A(w[j]);
    if (b != nullptr) v += A(b[j]);
    yr[j] = T(v);
  }
}

// Block `blockIdx.x` handles rows [blockIdx.x * rpg, ...); dw_part / db_part rows belong to it.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    layer_norm_bwd_kernel(const T* __restrict__ g, int64_t gs, const T* __restrict__ x, int64_t xs,
                          const T* __restrict__ w, const T* __restrict__ gres, int64_t grs,
                          T* __restrict__ dx, acc_t<T>* __restrict__ dw_part,
                          acc_t<T>* __restrict__ db_part, int64_t rows, int64_t rpg, int n,
                          acc_t<T> eps) {
  using A = acc_t<T>;
  __shared__ A smem[4 * 32];
  A* dw = dw_part != nullptr ? dw_part + blockIdx.x * int64_t(n) : nullptr;
  A* db = db_part != nullptr ? db_part + blockIdx.x * int64_t(n) : nullptr;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    if (dw != nullptr) dw[j] = A(0);
    if (db != nullptr) db[j] = A(0);
  }
  const int64_t begin = blockIdx.x * rpg, end = min(rows, begin + rpg);
  for (int64_t row = begin; row < end; ++row) {
    const T* xr = x + row * xs;
    const T* gr = g + row * gs;
    A s[1] = {A(0)};
    for (int j = threadIdx.x; j < n; j += blockDim.x) s[0] += A(xr[j]);
    cuda::block_sum<A, 1>(s, smem);
    const A mean0 = s[0] / A(n);
    A acc[4] = {A(0), A(0), A(0), A(0)};  // sum d, sum d^2, sum g w, sum g w d
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      const A d = A(xr[j]) - mean0;
      const A gw = A(gr[j]) * (w != nullptr ? A(w[j]) : A(1));
      acc[0] += d;
      acc[1] += d * d;
      acc[2] += gw;
      acc[3] += gw * d;
    }
    cuda::block_sum<A, 4>(acc, smem);
    const A delta = acc[0] / A(n);
    const A var = max(acc[1] / A(n) - delta * delta, A(0));
    const A rstd = rsqrt_acc(var + eps);
    // An infinite sum g w would turn the rounding-sized correction into inf - inf.
    const A dot = finite_acc(acc[2]) ? acc[3] - delta * acc[2] : acc[3];
    const A mean = mean0 + delta, mean_gw = acc[2] / A(n);
    const A coef = dot * rstd * rstd * rstd / A(n);
    T* dxr = dx + row * n;
    const T* grr = gres != nullptr ? gres + row * grs : nullptr;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      const A xc = A(xr[j]) - mean;
      const A gv = A(gr[j]);
      const A gw = gv * (w != nullptr ? A(w[j]) : A(1));
      A d = (gw - mean_gw) * rstd - xc * coef;
      if (grr != nullptr) d += A(grr[j]);
      dxr[j] = T(d);
      if (dw != nullptr) dw[j] += gv * (xc * rstd);
      if (db != nullptr) db[j] += gv;
    }
  }
}

// out[j] = sum over groups of part[group][j], in group order.
template <typename T>
__global__ void layer_norm_param_reduce_kernel(const acc_t<T>* __restrict__ part,
                                               T* __restrict__ out, int64_t groups, int n) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  acc_t<T> s = 0;
  for (int64_t b = 0; b < groups; ++b) s += part[b * n + j];
  out[j] = T(s);
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace

namespace cuda {

void launch_layer_norm_forward(const at::Tensor& x, const at::Tensor& residual,
                               const at::Tensor& weight, const at::Tensor& bias, double eps,
                               const at::Tensor& out, const at::Tensor& residual_out) {
  const int64_t rows = x.size(0);
  const int n = static_cast<int>(x.size(1));
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, ceil_div(n, 32) * 32));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd", [&] {
    layer_norm_fwd_kernel<scalar_t><<<rows, threads, 0, current_stream()>>>(
        x.const_data_ptr<scalar_t>(), x.stride(0), ptr_or_null<scalar_t>(residual),
        residual.defined() ? residual.stride(0) : 0, ptr_or_null<scalar_t>(weight),
        ptr_or_null<scalar_t>(bias), out.mutable_data_ptr<scalar_t>(),
        residual_out.defined() ? residual_out.mutable_data_ptr<scalar_t>() : nullptr, n,
        static_cast<acc_t<scalar_t>>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_layer_norm_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& grad_res, double eps, const at::Tensor& dx,
                                const at::Tensor& dw, const at::Tensor& db) {
  const int64_t rows = x.size(0);
  const int n = static_cast<int>(x.size(1));
  int64_t groups = std::min<int64_t>(kMaxGroups, ceil_div(rows, kMinRowsPerGroup));
  const int64_t rpg = ceil_div(rows, groups);
  groups = ceil_div(rows, rpg);
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, ceil_div(n, 32) * 32));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_bwd", [&] {
    using A = acc_t<scalar_t>;
    const auto aopts = x.options().dtype(c10::CppTypeToScalarType<A>());
    at::Tensor dw_part = dw.defined() ? at::empty({groups, n}, aopts) : at::Tensor();
    at::Tensor db_part = db.defined() ? at::empty({groups, n}, aopts) : at::Tensor();
    layer_norm_bwd_kernel<scalar_t><<<groups, threads, 0, current_stream()>>>(
        g.const_data_ptr<scalar_t>(), g.stride(0), x.const_data_ptr<scalar_t>(), x.stride(0),
        ptr_or_null<scalar_t>(weight), ptr_or_null<scalar_t>(grad_res),
        grad_res.defined() ? grad_res.stride(0) : 0, dx.mutable_data_ptr<scalar_t>(),
        dw_part.defined() ? dw_part.mutable_data_ptr<A>() : nullptr,
        db_part.defined() ? db_part.mutable_data_ptr<A>() : nullptr, rows, rpg, n,
        static_cast<A>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int rthreads = 256;
    const auto rblocks = static_cast<unsigned>(ceil_div(n, rthreads));
    if (dw.defined()) {
      layer_norm_param_reduce_kernel<scalar_t><<<rblocks, rthreads, 0, current_stream()>>>(
          dw_part.const_data_ptr<A>(), dw.mutable_data_ptr<scalar_t>(), groups, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (db.defined()) {
      layer_norm_param_reduce_kernel<scalar_t><<<rblocks, rthreads, 0, current_stream()>>>(
          db_part.const_data_ptr<A>(), db.mutable_data_ptr<scalar_t>(), groups, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace cuda
}  // namespace metalcore
