// RMSNorm over rows: strided sum of squares, simd_sum, threadgroup scratch across simd-groups.
#include <metal_stdlib>
using namespace metal;

template <typename T>
kernel void rmsnorm(device const T* x [[buffer(0)]], device const T* w [[buffer(1)]],
                    device T* y [[buffer(2)]], constant uint& cols [[buffer(3)]],
                    constant float& eps [[buffer(4)]], uint row [[threadgroup_position_in_grid]],
                    uint tid [[thread_index_in_threadgroup]], uint tpg [[threads_per_threadgroup]],
                    uint lane [[thread_index_in_simdgroup]],
                    uint sg [[simdgroup_index_in_threadgroup]],
                    uint n_sg [[simdgroups_per_threadgroup]]) {
  threadgroup float partial[32];
  device const T* xr = x + row * cols;
  float acc = 0.0f;
  for (uint i = tid; i < cols; i += tpg) {
    float v = float(xr[i]);
    acc += v * v;
  }
  acc = simd_sum(acc);
  if (lane == 0) partial[sg] = acc;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    float total = simd_sum(lane < n_sg ? partial[lane] : 0.0f);
    if (lane == 0) partial[0] = rsqrt(total / float(cols) + eps);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float scale = partial[0];
  for (uint i = tid; i < cols; i += tpg) y[row * cols + i] = T(float(xr[i]) * scale * float(w[i]));
}
#define INSTANTIATE(T)                                                                          \
  template [[host_name("rmsnorm_" #T)]] kernel void rmsnorm<T>(                                 \
      device const T*, device const T*, device T*, constant uint&, constant float&, uint, uint, \
      uint, uint, uint, uint);
INSTANTIATE(float)
INSTANTIATE(half)
INSTANTIATE(bfloat)
