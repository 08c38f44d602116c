// embedding_bag family: parameters shared by embedding_bag.metal and the host launcher
// (csrc/embedding_bag/embedding_bag_launch.cpp).
#pragma once

#include "common/defines.h"

namespace metalcore {
namespace embedding_bag_k {

// Threads per threadgroup of every kernel (one thread per output element or position).
METALCORE_CONSTEXPR unsigned kThreads = 256;

// Modes, as embedding_bag::Mode on the host.
METALCORE_CONSTEXPR unsigned kSum = 0;
METALCORE_CONSTEXPR unsigned kMean = 1;
METALCORE_CONSTEXPR unsigned kMax = 2;

struct Params {
  METALCORE_U64 d;     // embedding_dim
  METALCORE_U64 rows;  // bags (forward, argmax) or weight rows (weight gradient)
  METALCORE_U64 n;     // indices (per_sample_weights gradient)
  METALCORE_U64 pad1;  // padding_idx + 1; 0: no padding row
  unsigned mode;
  unsigned has_psw;
};

// Host and kernel must agree on this layout byte for byte (it travels as set_bytes data).
#ifndef __METAL_VERSION__
static_assert(sizeof(Params) == 40);
#endif

}  // namespace embedding_bag_k
}  // namespace metalcore
