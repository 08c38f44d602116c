// CPU kernels of the softmax family (compiled per CPU capability, see common/cpu_dispatch.h).
// All tensors are contiguous [outer, n, inner], softmax over dim 1, one dtype.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/cpu_dispatch.h"

#define METALCORE_SOFTMAX_CPU_KERNELS                                                        \
  /* out = softmax(x) (log_softmax(x) when log) over dim 1. */                               \
  void softmax_forward(const at::Tensor& x, bool log, const at::Tensor& out);                \
  /* softmax: grad_in = y * (g - sum(g * y)); log_softmax: grad_in = g - exp(y) * sum(g). */ \
  void softmax_backward(const at::Tensor& grad_out, const at::Tensor& y, bool log,           \
                        const at::Tensor& grad_in);

METALCORE_DECLARE_CPU_KERNELS(METALCORE_SOFTMAX_CPU_KERNELS)
