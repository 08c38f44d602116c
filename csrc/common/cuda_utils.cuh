// Helpers shared by the CUDA kernels: 16-byte vector access, fp32 (fp64 for double) accumulation
// types, warp/block reductions and launch bookkeeping.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace metalcore::cuda {

// Accumulation type: fp32 for 16-bit and fp32 inputs, fp64 for double.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

// VEC elements of T in one aligned access (16 bytes when VEC == 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

// Streaming load: data read once should not evict data that is reused (weights, cos/sin).
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec_stream(const T* p) {
  if constexpr (sizeof(T) * VEC == 16) {
    int4 r = __ldcs(reinterpret_cast<const int4*>(p));
    return *reinterpret_cast<Vec<T, VEC>*>(&r);
  } else {
    return *reinterpret_cast<const Vec<T, VEC>*>(p);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& v) {
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

template <typename T>
constexpr int vec_width() {
  return 16 / sizeof(T);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// exp and log in the accumulation type (float32 for 16-bit and float32 data, float64 for float64).
template <typename A>
__device__ __forceinline__ A exp_acc(A v) {
  if constexpr (std::is_same_v<A, double>) {
    return exp(v);
  } else {
    return expf(v);
  }
}

template <typename A>
__device__ __forceinline__ A log_acc(A v) {
  if constexpr (std::is_same_v<A, double>) {
    return log(v);
  } else {
    return logf(v);
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of NV values over the block; every thread gets the totals. `smem` holds 32 * NV values.
// Ends with a barrier so `smem` can be reused right after.
template <typename A, int NV>
__device__ __forceinline__ void block_sum(A (&v)[NV], A* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int i = 0; i < NV; ++i) v[i] = warp_sum(v[i]);
  if (nwarps == 1) return;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) smem[i * 32 + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    A t = lane < nwarps ? smem[i * 32 + lane] : A(0);
    v[i] = warp_sum(t);
  }
  __syncthreads();
}

// Multiprocessor count of the current device, read once per device.
inline int sm_count() {
  static int cached[64] = {0};
  const int dev = c10::cuda::current_device();
  if (dev < 64 && cached[dev] > 0) return cached[dev];
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (dev < 64) cached[dev] = sms;
  return sms;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace metalcore::cuda
