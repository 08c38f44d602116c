// CPU kernels of the RoPE family (compiled per CPU capability, see common/cpu_dispatch.h).
// q/k: [B, H, S, D] with a unit stride on D (any other strides); cos/sin: [B or 1, S, R] with a
// unit stride on R, dtype float32 or q's; outputs contiguous [B, H, S, D].
#pragma once

#include <ATen/core/Tensor.h>

#include "common/cpu_dispatch.h"

#define METALCORE_ROPE_CPU_KERNELS                                                             \
  /* transpose=false: out = x * cos + rotate(x) * sin; true: the transposed map (backward). */ \
  void rope_apply(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,             \
                  const at::Tensor& sin, bool interleaved, bool transpose,                     \
                  const at::Tensor& q_out, const at::Tensor& k_out);

METALCORE_DECLARE_CPU_KERNELS(METALCORE_ROPE_CPU_KERNELS)
