// C = A * B with 8x8 simdgroup matrices: one simd-group per 8x8 output tile.
#include <metal_stdlib>
using namespace metal;

template <typename T>
kernel void matmul8(device const T* a [[buffer(0)]], device const T* b [[buffer(1)]],
                    device float* c [[buffer(2)]], constant uint3& mnk [[buffer(3)]],
                    uint2 tile [[threadgroup_position_in_grid]]) {
  const uint n = mnk.y, k = mnk.z;
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  simdgroup_matrix<T, 8, 8> ma, mb;
  for (uint kk = 0; kk < k; kk += 8) {
    simdgroup_load(ma, a, k, ulong2(kk, tile.y * 8));
    simdgroup_load(mb, b, n, ulong2(tile.x * 8, kk));
    simdgroup_multiply_accumulate(acc, ma, mb, acc);
  }
  simdgroup_store(acc, c, n, ulong2(tile.x * 8, tile.y * 8));
}
template [[host_name("matmul8_float")]] kernel void matmul8<float>(device const float*,
                                                                   device const float*,
                                                                   device float*, constant uint3&,
                                                                   uint2);
template [[host_name("matmul8_half")]] kernel void matmul8<half>(device const half*,
                                                                 device const half*, device float*,
                                                                 constant uint3&, uint2);
