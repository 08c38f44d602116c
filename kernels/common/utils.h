// Device-side helpers shared by every kernel family (Metal only).
#pragma once

#include <metal_stdlib>

#include "common/defines.h"

namespace metalcore {

// Sum of `v` over the whole threadgroup, returned to every thread. `scratch` holds one slot per
// simdgroup; the trailing barrier lets the caller reuse it for the next row.
template <typename V>
inline V threadgroup_sum(V v, threadgroup V* scratch, uint lane, uint sg, uint n_sg) {
  v = metal::simd_sum(v);
  if (n_sg == 1) return v;  // uniform across the threadgroup
  if (lane == 0) scratch[sg] = v;
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  // Every simdgroup reduces the partials itself: no broadcast round trip through memory.
  V total = metal::simd_sum(lane < n_sg ? scratch[lane] : V(0));
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  return total;
}

}  // namespace metalcore

// One explicit instantiation with its host name "<family>_<variant>_<dtype>"; the C++ side
// builds the same names with metalcore::kernel_name (csrc/common/kernel_name.h).
#define METALCORE_HOST_NAME(family, variant, dtype) #family "_" #variant "_" #dtype

// Calls X(type, dtype token) for every floating dtype a kernel is instantiated for.
#define METALCORE_FOR_EACH_FLOAT(X) \
  X(float, float32)                 \
  X(half, float16)                  \
  X(bfloat, bfloat16)
