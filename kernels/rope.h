// RoPE family: parameters shared by rope.metal and the host launcher.
#pragma once

#include "common/defines.h"

namespace metalcore {
namespace rope_k {

// Heads handled by one thread: each cos/sin load is reused this many times.
METALCORE_CONSTEXPR unsigned kHeadsPerThread = 4;

struct Params {
  METALCORE_U64 in_stride_b, in_stride_h, in_stride_s;  // input strides in elements (dim -1: 1)
  METALCORE_U64 table_stride_b, table_stride_s;         // cos/sin; table_stride_b = 0 broadcasts
  unsigned heads, seq, head_dim, rot;
  unsigned transpose;  // 1: apply the transposed map (backward)
};

// Host and kernel must agree on this layout byte for byte (it travels as set_bytes data).
#ifndef __METAL_VERSION__
static_assert(sizeof(Params) == 64);
#endif

}  // namespace rope_k
}  // namespace metalcore
