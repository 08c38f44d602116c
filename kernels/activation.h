// Activation family (silu, gelu, swiglu): launch constants shared by activation.metal and the host.
#pragma once

#include "common/defines.h"

namespace metalcore::activation_k {

// Threads per threadgroup and elements per thread: each thread keeps kIlp independent loads in
// flight; thread t of a group owns elements t, t + kThreads, ... of its block (coalesced loads).
METALCORE_CONSTEXPR unsigned kThreads = 256;
METALCORE_CONSTEXPR unsigned kIlp = 4;
METALCORE_CONSTEXPR unsigned kBlock = kThreads * kIlp;  // elements per threadgroup

struct Params {
  METALCORE_U64 numel;
};

}  // namespace metalcore::activation_k
