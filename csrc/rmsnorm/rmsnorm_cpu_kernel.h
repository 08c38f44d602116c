// CPU kernels of the RMSNorm family (compiled per CPU capability, see common/cpu_dispatch.h).
// All tensors are 2-D [rows, N] with a unit stride on the last dim (rows may be strided);
// outputs are contiguous. Optional tensors are passed undefined.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/cpu_dispatch.h"

#define METALCORE_RMSNORM_CPU_KERNELS                                                              \
  /* out = rmsnorm(x [+ residual]) * weight; residual_out = x + residual when given. */            \
  void rmsnorm_forward(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,  \
                       double eps, const at::Tensor& out, const at::Tensor& residual_out);         \
  /* grad_input (+= grad_residual when given) and grad_weight (when weight is given). */           \
  void rmsnorm_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, \
                        const at::Tensor& grad_residual, double eps, const at::Tensor& grad_input, \
                        const at::Tensor& grad_weight);

METALCORE_DECLARE_CPU_KERNELS(METALCORE_RMSNORM_CPU_KERNELS)
