// CUDA kernels of the quantization family (compile-checked; no GPU has run them yet).
//
// One device decoder gives any weight element of any format from the stored bytes (the
// definitions of quant_cpu_kernel.cpp, element by element). On top of it:
//   - dequantize: one thread per weight element;
//   - linear with m <= kGemvRows (decode): one warp per output row; lanes stride over k, decode
//     each weight once and apply it to every activation row, warp-reduce at the end;
//   - linear with larger m, and the backward: dequantize W once into the accumulation type, then
//     a cuBLAS matmul (at::mm), the dequantize + GEMM path the guide sets beyond the crossover.
// Tuning (vectorized nibble loads, several rows per warp, split-K) waits for a GPU to measure.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "quant/quant_cuda.h"

namespace metalcore {
namespace {

using quant::Format;

constexpr int64_t kGemvRows = 8;
constexpr int kWarpsPerBlock = 8;

// The weight as plain device pointers (a kernel argument).
struct DevWeight {
  Format format;
  const uint8_t* data;
  int64_t row_bytes;
  const void* scales;
  const void* biases;
  int scale_type;  // 0 float, 1 half, 2 bfloat16, 3 double
  int64_t group;
  int64_t k;
};

DevWeight dev_weight(const quant::QWeight& w) {
  int st = 0;
  const void* s = nullptr;
  const void* b = nullptr;
  if (w.scales.defined()) {
    const auto t = w.scales.scalar_type();
    st = t == at::kHalf ? 1 : t == at::kBFloat16 ? 2 : t == at::kDouble ? 3 : 0;
    s = w.scales.const_data_ptr();
    b = w.biases.const_data_ptr();
  }
  return {w.format, w.data.const_data_ptr<uint8_t>(), w.data.size(1), s, b, st, w.group, w.k};
}

template <typename A>
__device__ __forceinline__ A param_at(const void* p, int type, int64_t i) {
  switch (type) {
    case 1:
      return static_cast<A>(__half2float(static_cast<const __half*>(p)[i]));
    case 2:
      return static_cast<A>(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
    case 3:
      return static_cast<A>(static_cast<const double*>(p)[i]);
    default:
      return static_cast<A>(static_cast<const float*>(p)[i]);
  }
}

// GGUF blocks are only 2-byte aligned: assemble fp16 fields from bytes.
__device__ __forceinline__ float half_at(const uint8_t* p) {
  const unsigned short bits = static_cast<unsigned short>(p[0] | (p[1] << 8));
  return __half2float(__ushort_as_half(bits));
}

// Weight (row, col) in the accumulation type A.
template <typename A>
__device__ A decode(const DevWeight& w, int64_t row, int64_t col) {
  const uint8_t* r = w.data + row * w.row_bytes;
  switch (w.format) {
    case Format::Int4:
    case Format::Int8: {
      const int q =
          w.format == Format::Int4 ? (col & 1 ? r[col / 2] >> 4 : r[col / 2] & 0xF) : r[col];
      const int64_t i = row * (w.k / w.group) + col / w.group;
      return param_at<A>(w.scales, w.scale_type, i) * static_cast<A>(q) +
             param_at<A>(w.biases, w.scale_type, i);
    }
    case Format::Q4_0: {
      const uint8_t* p = r + (col / 32) * quant::kQ4_0Bytes;
      const int j = static_cast<int>(col % 32);
      const int byte = p[2 + (j % 16)];
      const int q = j < 16 ? byte & 0xF : byte >> 4;
      return static_cast<A>(half_at(p) * static_cast<float>(q - 8));
    }
    case Format::Q8_0: {
      const uint8_t* p = r + (col / 32) * quant::kQ8_0Bytes;
      const int q = static_cast<int8_t>(p[2 + col % 32]);
      return static_cast<A>(half_at(p) * static_cast<float>(q));
    }
    case Format::Q4_K: {
      const uint8_t* p = r + (col / 256) * quant::kQ4_KBytes;
      const int j = static_cast<int>(col % 256), sub = j / 32, l = j % 32;
      const uint8_t* sc = p + 4;
      int scale, min;
      if (sub < 4) {
        scale = sc[sub] & 63;
        min = sc[sub + 4] & 63;
      } else {
        scale = (sc[sub + 4] & 0xF) | ((sc[sub - 4] >> 6) << 4);
        min = (sc[sub + 4] >> 4) | ((sc[sub] >> 6) << 4);
      }
      const int q = (p[16 + 32 * (sub / 2) + l] >> (4 * (sub % 2))) & 0xF;
      // Both products are exact in float; one rounding of the difference, as ggml.
      const float ds = __fmul_rn(half_at(p), static_cast<float>(scale));
      const float dm = __fmul_rn(half_at(p + 2), static_cast<float>(min));
      return static_cast<A>(__fsub_rn(__fmul_rn(ds, static_cast<float>(q)), dm));
    }
    case Format::Q6_K: {
      const uint8_t* p = r + (col / 256) * quant::kQ6_KBytes;
      const int j = static_cast<int>(col % 256), half = j / 128, t = j % 128, rr = t / 32,
                l = t % 32;
      const int low = (p[64 * half + l + 32 * (rr % 2)] >> (4 * (rr / 2))) & 0xF;
      const int high = (p[128 + 32 * half + l] >> (2 * rr)) & 3;
      const int q = (low | (high << 4)) - 32;
      const int sc = static_cast<int8_t>(p[192 + 8 * half + 2 * rr + l / 16]);
      return static_cast<A>(half_at(p + 208) * static_cast<float>(sc) * static_cast<float>(q));
    }
  }
  return A(0);
}

template <typename T, typename A>
__global__ void dequantize_kernel(DevWeight w, int64_t n, T* out) {
  const int64_t total = n * w.k;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<T>(decode<A>(w, i / w.k, i % w.k));
  }
}

// One warp per weight row: out[i, row] = sum_k x[i, k] * W[row, k] (+ bias[row]), i < m.
template <typename T, typename A>
__global__ void gemv_kernel(const T* x, int64_t m, DevWeight w, int64_t n, const T* bias, T* out) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n) return;
  A acc[kGemvRows];
#pragma unroll
  for (int i = 0; i < kGemvRows; ++i) acc[i] = A(0);
  for (int64_t col = lane; col < w.k; col += 32) {
    const A wv = decode<A>(w, row, col);
#pragma unroll
    for (int i = 0; i < kGemvRows; ++i) {
      if (i < m) acc[i] += wv * static_cast<A>(x[i * w.k + col]);
    }
  }
#pragma unroll
  for (int i = 0; i < kGemvRows; ++i) {
    if (i >= m) break;
    const A s = cuda::warp_sum(acc[i]);
    if (lane == 0) {
      out[i * n + row] = static_cast<T>(s + (bias != nullptr ? static_cast<A>(bias[row]) : A(0)));
    }
  }
}

int grid_for(int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<int>(blocks < 65535 ? blocks : 65535);
}

}  // namespace

namespace cuda {

void quant_dequantize(const quant::QWeight& w, const at::Tensor& out) {
  const DevWeight dw = dev_weight(w);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "quant_dequantize", [&] {
        using A = cuda::acc_t<scalar_t>;
        dequantize_kernel<scalar_t, A><<<grid_for(w.n * w.k, 256), 256, 0, stream>>>(
            dw, w.n, out.mutable_data_ptr<scalar_t>());
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void quant_linear(const at::Tensor& x, const quant::QWeight& w, const at::Tensor& bias,
                  const at::Tensor& out) {
  const int64_t m = x.size(0);
  if (m <= kGemvRows) {
    const DevWeight dw = dev_weight(w);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const int blocks = static_cast<int>((w.n + kWarpsPerBlock - 1) / kWarpsPerBlock);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quant_linear", [&] {
      using A = cuda::acc_t<scalar_t>;
      gemv_kernel<scalar_t, A><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), m, dw, w.n,
          bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
          out.mutable_data_ptr<scalar_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Dequantize once, then cuBLAS in the accumulation type.
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor wd = at::empty({w.n, w.k}, x.options().dtype(acc));
  quant_dequantize(w, wd);
  at::Tensor y = at::mm(x.to(acc), wd.t());
  if (bias.defined()) y.add_(bias.to(acc));
  out.copy_(y);
}

void quant_linear_backward(const at::Tensor& grad, const quant::QWeight& w,
                           const at::Tensor& grad_input) {
  const at::ScalarType acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor wd = at::empty({w.n, w.k}, grad.options().dtype(acc));
  quant_dequantize(w, wd);
  grad_input.copy_(at::mm(grad.to(acc), wd));
}

}  // namespace cuda
}  // namespace metalcore
