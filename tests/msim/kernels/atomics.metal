// Histogram: threadgroup atomic bins merged into device bins; float atomic sum.
#include <metal_stdlib>
using namespace metal;

kernel void histogram(device const uint* x [[buffer(0)]], device atomic_uint* bins [[buffer(1)]],
                      constant uint& n [[buffer(2)]], uint gid [[thread_position_in_grid]],
                      uint tid [[thread_index_in_threadgroup]],
                      uint tpg [[threads_per_threadgroup]]) {
  threadgroup atomic_uint local[16];
  for (uint i = tid; i < 16; i += tpg) atomic_store_explicit(&local[i], 0u, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (gid < n) atomic_fetch_add_explicit(&local[x[gid] % 16], 1u, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint i = tid; i < 16; i += tpg) {
    uint c = atomic_load_explicit(&local[i], memory_order_relaxed);
    if (c) atomic_fetch_add_explicit(&bins[i], c, memory_order_relaxed);
  }
}

kernel void atomic_sum(device const float* x [[buffer(0)]],
                       device atomic_float* total [[buffer(1)]],
                       device atomic_int* maxv [[buffer(2)]],
                       uint gid [[thread_position_in_grid]]) {
  atomic_fetch_add_explicit(total, x[gid], memory_order_relaxed);
  atomic_fetch_max_explicit(maxv, int(x[gid] * 100.0f), memory_order_relaxed);
}
