// Softmax family (softmax, log_softmax, their backward ops): parameters shared by softmax.metal
// and the host launcher (csrc/softmax/softmax_launch.cpp).
#pragma once

#include "common/defines.h"

namespace metalcore {
namespace softmax_k {

// Columns (inner > 1): threads per threadgroup, one thread per (outer, inner) column.
METALCORE_CONSTEXPR unsigned kColumnThreads = 256;
// Rows (inner == 1): at most this many threads per row's threadgroup.
METALCORE_CONSTEXPR unsigned kRowThreads = 1024;

// Contiguous [outer, n, inner], softmax over n.
struct Params {
  METALCORE_U64 outer;
  METALCORE_U64 n;
  METALCORE_U64 inner;
  unsigned log;  // 1: log_softmax (and its backward)
  unsigned pad;
};

// Host and kernel must agree on this layout byte for byte (it travels as set_bytes data).
#ifndef __METAL_VERSION__
static_assert(sizeof(Params) == 32);
#endif

}  // namespace softmax_k

#ifdef __METAL_VERSION__
// Max over the threadgroup, returned to every thread (softmax and cross-entropy kernels), with
// threadgroup_sum's partial-slot scheme: only the slots of existing simdgroups are read.
inline float threadgroup_max(float v, threadgroup float* scratch, uint lane, uint sg, uint n_sg) {
  v = metal::simd_max(v);
  if (n_sg == 1) return v;
  if (lane == 0) scratch[sg] = v;
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  const float total = metal::simd_max(lane < n_sg ? scratch[lane] : -INFINITY);
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  return total;
}
#endif

}  // namespace metalcore
