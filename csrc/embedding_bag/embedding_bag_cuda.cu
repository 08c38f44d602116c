// CUDA kernels of the embedding_bag family.
//
// Forward: one block per (bag, slice of kThreads columns); each thread walks the bag's indices
// (the same index for every thread: a broadcast load) and accumulates its column in acc_t.
//
// Backward, deterministic without float atomics: the positions are sorted by weight row (a stable
// sort, so each row sees its positions in index order), and one block per (row, column slice)
// sums everything the row receives in that fixed order. Mode 'max' first recomputes each bag's
// argmax rows ([B, D] int64) with the forward's rule. grad_per_sample_weights: one warp per
// position, a dot product of the bag's gradient and the position's row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "common/cuda_utils.cuh"
#include "embedding_bag/embedding_bag_cuda.h"

namespace metalcore {
namespace {

using cuda::acc_t;
using cuda::ceil_div;
using cuda::current_stream;

constexpr int kThreads = 128;
// Modes as embedding_bag::Mode (sum is the default branch).
constexpr int64_t kMean = 1, kMax = 2;

// The bag reduction of column `col` (forward and the argmax of the backward). torch's max rule:
// the first row sets, a later one replaces only when strictly greater.
template <typename T>
__global__ void forward_kernel(const T* __restrict__ w, const int64_t* __restrict__ idx,
                               const int64_t* __restrict__ bnd, const T* __restrict__ psw,
                               int64_t padding_idx, int64_t d, int64_t mode, T* __restrict__ out,
                               int64_t* __restrict__ argmax) {
  using A = acc_t<T>;
  const int64_t b = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (col >= d) return;
  A acc = A(0);
  int64_t arg = -1, count = 0;
  for (int64_t i = bnd[b]; i < bnd[b + 1]; ++i) {
    const int64_t r = idx[i];
    if (r == padding_idx) continue;
    const A x = static_cast<A>(w[r * d + col]);
    if (mode == kMax) {
      if (count == 0 || x > acc) {
        acc = x;
        arg = r;
      }
    } else {
      acc += psw != nullptr ? static_cast<A>(psw[i]) * x : x;
    }
    ++count;
  }
  if (mode == kMean && count > 0) acc /= static_cast<A>(count);
  if (out != nullptr) out[b * d + col] = static_cast<T>(acc);
  if (argmax != nullptr) argmax[b * d + col] = arg;
}

// Per position: its bag (-1 past the last bag) and, per bag, the count of non-padding rows.
__global__ void bag_of_kernel(const int64_t* __restrict__ idx, const int64_t* __restrict__ bnd,
                              int64_t bags, int64_t padding_idx, int64_t* __restrict__ bag_of,
                              int64_t* __restrict__ count) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= bags) return;
  int64_t c = 0;
  for (int64_t i = bnd[b]; i < bnd[b + 1]; ++i) {
    bag_of[i] = b;
    c += idx[i] != padding_idx;
  }
  count[b] = c;
}

// One block per (row, column slice): the row's positions start[r] .. start[r + 1] of `order`.
template <typename T>
__global__ void weight_grad_kernel(const T* __restrict__ g, const int64_t* __restrict__ order,
                                   const int64_t* __restrict__ start,
                                   const int64_t* __restrict__ bag_of,
                                   const int64_t* __restrict__ count, const T* __restrict__ psw,
                                   const int64_t* __restrict__ argmax, int64_t d, int64_t mode,
                                   T* __restrict__ gw) {
  using A = acc_t<T>;
  const int64_t r = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (col >= d) return;
  A acc = A(0);
  int64_t last_bag = -1;
  for (int64_t k = start[r]; k < start[r + 1]; ++k) {
    const int64_t i = order[k];
    const int64_t b = bag_of[i];
    const A gv = static_cast<A>(g[b * d + col]);
    if (mode == kMax) {
      // A row repeated within a bag took the max once: its gradient arrives once.
      if (b != last_bag && argmax[b * d + col] == r) acc += gv;
      last_bag = b;
    } else if (psw != nullptr) {
      acc += static_cast<A>(psw[i]) * gv;
    } else if (mode == kMean) {
      acc += gv / static_cast<A>(count[b]);
    } else {
      acc += gv;
    }
  }
  gw[r * d + col] = static_cast<T>(acc);
}

// One warp per position: grad_psw[i] = dot(g[bag], w[idx[i]]), 0 for padding or no bag.
template <typename T>
__global__ void psw_grad_kernel(const T* __restrict__ g, const T* __restrict__ w,
                                const int64_t* __restrict__ idx, const int64_t* __restrict__ bag_of,
                                int64_t n, int64_t d, int64_t padding_idx, T* __restrict__ gp) {
  using A = acc_t<T>;
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (i >= n) return;  // whole warps exit together: n is per warp
  const int64_t b = bag_of[i], r = idx[i];
  A acc = A(0);
  if (b >= 0 && r != padding_idx) {
    for (int64_t j = lane; j < d; j += 32) {
      acc += static_cast<A>(g[b * d + j]) * static_cast<A>(w[r * d + j]);
    }
  }
  acc = cuda::warp_sum(acc);
  if (lane == 0) gp[i] = static_cast<T>(acc);
}

dim3 row_grid(int64_t rows, int64_t d) {
  return dim3(static_cast<unsigned>(rows), static_cast<unsigned>(ceil_div(d, kThreads)));
}

}  // namespace

namespace cuda {

void launch_embedding_bag_forward(const at::Tensor& weight, const at::Tensor& indices,
                                  const at::Tensor& bounds, int64_t mode, const at::Tensor& psw,
                                  int64_t padding_idx, const at::Tensor& out) {
  const int64_t bags = out.size(0), d = out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "metalcore.embedding_bag", [&] {
        forward_kernel<scalar_t><<<row_grid(bags, d), kThreads, 0, current_stream()>>>(
            weight.const_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(),
            bounds.const_data_ptr<int64_t>(),
            psw.defined() ? psw.const_data_ptr<scalar_t>() : nullptr, padding_idx, d, mode,
            out.mutable_data_ptr<scalar_t>(), nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void launch_embedding_bag_backward(const at::Tensor& grad_out, const at::Tensor& weight,
                                   const at::Tensor& indices, const at::Tensor& bounds,
                                   int64_t mode, const at::Tensor& psw, int64_t padding_idx,
                                   const at::Tensor& grad_weight, const at::Tensor& grad_psw) {
  const int64_t bags = grad_out.size(0), d = grad_out.size(1);
  const int64_t v = grad_weight.size(0), n = indices.size(0);
  const auto long_opts = indices.options();
  at::Tensor bag_of = at::full({n}, -1, long_opts);
  at::Tensor count = at::empty({bags}, long_opts);
  bag_of_kernel<<<static_cast<unsigned>(ceil_div(bags, 256)), 256, 0, current_stream()>>>(
      indices.const_data_ptr<int64_t>(), bounds.const_data_ptr<int64_t>(), bags, padding_idx,
      bag_of.mutable_data_ptr<int64_t>(), count.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Positions outside every bag and padding positions sort last under the key V, past every
  // row's segment.
  const at::Tensor keys = at::where(bag_of.ge(0).logical_and_(indices.ne(padding_idx)), indices, v);
  // Plain tensors, not structured bindings: the dispatch lambda below captures them.
  const auto sorted_order = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& sorted = std::get<0>(sorted_order);
  const at::Tensor& order = std::get<1>(sorted_order);
  const at::Tensor start = at::searchsorted(sorted, at::arange(v + 1, long_opts));
  at::Tensor argmax;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "metalcore.embedding_bag_backward", [&] {
        const scalar_t* ps = psw.defined() ? psw.const_data_ptr<scalar_t>() : nullptr;
        if (mode == kMax) {
          argmax = at::empty({bags, d}, long_opts);
          forward_kernel<scalar_t><<<row_grid(bags, d), kThreads, 0, current_stream()>>>(
              weight.const_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(),
              bounds.const_data_ptr<int64_t>(), nullptr, padding_idx, d, mode, nullptr,
              argmax.mutable_data_ptr<int64_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (v > 0) {
          weight_grad_kernel<scalar_t><<<row_grid(v, d), kThreads, 0, current_stream()>>>(
              grad_out.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(),
              start.const_data_ptr<int64_t>(), bag_of.const_data_ptr<int64_t>(),
              count.const_data_ptr<int64_t>(), ps,
              argmax.defined() ? argmax.const_data_ptr<int64_t>() : nullptr, d, mode,
              grad_weight.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (grad_psw.defined() && n > 0) {
          psw_grad_kernel<scalar_t>
              <<<static_cast<unsigned>(ceil_div(n * 32, 256)), 256, 0, current_stream()>>>(
                  grad_out.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                  indices.const_data_ptr<int64_t>(), bag_of.const_data_ptr<int64_t>(), n, d,
                  padding_idx, grad_psw.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
}

}  // namespace cuda
}  // namespace metalcore
