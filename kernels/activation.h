// Activation family (silu, gelu, swiglu): launch constants shared by activation.metal and the host.
#pragma once

#include "common/defines.h"

namespace metalcore {
namespace activation_k {

// Threads per threadgroup and elements per thread: each thread keeps kIlp independent loads in
// flight; thread t of a group owns elements t, t + kThreads, ... of its block (coalesced loads).
METALCORE_CONSTEXPR unsigned kThreads = 256;
METALCORE_CONSTEXPR unsigned kIlp = 4;

struct Params {
  METALCORE_U64 numel;
};

// Host and kernel must agree on this layout byte for byte (it travels as set_bytes data).
#ifndef __METAL_VERSION__
static_assert(sizeof(Params) == 8);
#endif

}  // namespace activation_k
}  // namespace metalcore
