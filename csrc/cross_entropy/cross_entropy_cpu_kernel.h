// CPU kernels of the cross-entropy family (compiled per CPU capability, see
// common/cpu_dispatch.h). x: [N, C] with unit stride on C (rows may be strided); target: [N]
// contiguous int64 already checked to hold indices in [0, C) or ignore_index; losses and scale:
// [N] contiguous float32 (float64 for float64 x); grad_in: contiguous [N, C] of x's dtype.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/cpu_dispatch.h"

#define METALCORE_CROSS_ENTROPY_CPU_KERNELS                                                       \
  /* losses[i] = lse_i - (1 - eps) x[i, t_i] - eps mean(x_i); 0 where t_i == ignore_index. */     \
  void cross_entropy_forward(const at::Tensor& x, const at::Tensor& target, int64_t ignore_index, \
                             double smoothing, const at::Tensor& losses);                         \
  /* grad_in[i] = scale[i] (softmax(x_i) - (1 - eps) onehot(t_i) - eps / C); 0 if ignored. */     \
  void cross_entropy_backward(const at::Tensor& scale, const at::Tensor& x,                       \
                              const at::Tensor& target, int64_t ignore_index, double smoothing,   \
                              const at::Tensor& grad_in);

METALCORE_DECLARE_CPU_KERNELS(METALCORE_CROSS_ENTROPY_CPU_KERNELS)
