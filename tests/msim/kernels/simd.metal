// Simd-group collectives: prefix sums, shuffles, ballot, and ballot-based stream compaction.
#include <metal_stdlib>
using namespace metal;

// Writes 8 results per thread so one dispatch checks every collective (partial groups too).
kernel void simd_ops(device const int* x [[buffer(0)]], device int* out [[buffer(1)]],
                     uint gid [[thread_position_in_grid]],
                     uint lane [[thread_index_in_simdgroup]]) {
  int v = x[gid];
  device int* o = out + gid * 8;
  o[0] = simd_prefix_exclusive_sum(v);
  o[1] = simd_prefix_inclusive_sum(v);
  o[2] = simd_sum(v);
  o[3] = simd_max(v);
  o[4] = simd_shuffle_down(v, 1);
  o[5] = simd_shuffle_xor(v, 1);
  o[6] = simd_broadcast(v, 0);
  o[7] = int(uint(static_cast<ulong>(simd_ballot(v > 0)) & 0xffffffffu));
  if (lane % 2 == 0) o[2] = simd_sum(v);  // divergent: only even lanes take part
}

// Keeps x[i] > 0 in order within each threadgroup; threadgroups claim output ranges atomically.
kernel void compact(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                    device atomic_uint* count [[buffer(2)]], constant uint& n [[buffer(3)]],
                    uint gid [[thread_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
                    uint lane [[thread_index_in_simdgroup]],
                    uint sg [[simdgroup_index_in_threadgroup]],
                    uint n_sg [[simdgroups_per_threadgroup]]) {
  threadgroup uint sg_offset[32];
  threadgroup uint base;
  bool keep = gid < n && x[gid] > 0.0f;
  uint rank = simd_prefix_exclusive_sum(uint(keep));
  uint kept = popcount(uint(static_cast<ulong>(simd_ballot(keep))));
  if (lane == 0) sg_offset[sg] = kept;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    uint total = 0;
    for (uint i = 0; i < n_sg; ++i) {
      uint c = sg_offset[i];
      sg_offset[i] = total;
      total += c;
    }
    base = atomic_fetch_add_explicit(count, total, memory_order_relaxed);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (keep) out[base + sg_offset[sg] + rank] = x[gid];
}

// Quad-group functions over groups of four lanes.
kernel void quad_ops(device const int* x [[buffer(0)]], device int* out [[buffer(1)]],
                     uint gid [[thread_position_in_grid]], uint q [[thread_index_in_quadgroup]]) {
  int v = x[gid];
  device int* o = out + gid * 5;
  o[0] = quad_sum(v);
  o[1] = quad_shuffle_xor(v, 1);
  o[2] = quad_broadcast(v, 3);
  o[3] = quad_prefix_exclusive_sum(v);
  o[4] = int(q);
}
