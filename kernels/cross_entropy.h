// Cross-entropy family: parameters shared by cross_entropy.metal and the host launcher
// (csrc/cross_entropy/cross_entropy_launch.cpp).
#pragma once

#include "common/defines.h"

namespace metalcore {
namespace cross_entropy_k {

// At most this many threads per row's threadgroup.
METALCORE_CONSTEXPR unsigned kRowThreads = 1024;

struct Params {
  METALCORE_U64 x_stride;      // elements between consecutive rows of the logits
  METALCORE_U64 ignore_index;  // the int64 value, bit for bit
  unsigned n;                  // classes (row length)
  float smoothing;             // label smoothing eps
};

// Host and kernel must agree on this layout byte for byte (it travels as set_bytes data).
#ifndef __METAL_VERSION__
static_assert(sizeof(Params) == 24);
#endif

}  // namespace cross_entropy_k
}  // namespace metalcore
