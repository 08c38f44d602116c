// CPU kernels of the LayerNorm family (compiled per CPU capability, see common/cpu_dispatch.h).
// All tensors are 2-D [rows, N] with a unit stride on the last dim (rows may be strided);
// outputs are contiguous. Optional tensors are passed undefined.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/cpu_dispatch.h"

#define METALCORE_LAYER_NORM_CPU_KERNELS                                                          \
  /* out = layer_norm(x [+ residual]) * weight + bias; residual_out = x + residual when given. */ \
  void layer_norm_forward(const at::Tensor& x, const at::Tensor& residual,                        \
                          const at::Tensor& weight, const at::Tensor& bias, double eps,           \
                          const at::Tensor& out, const at::Tensor& residual_out);                 \
  /* grad_input (+= grad_residual when given), grad_weight and grad_bias (when defined). */       \
  void layer_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,                       \
                           const at::Tensor& weight, const at::Tensor& grad_residual, double eps, \
                           const at::Tensor& grad_input, const at::Tensor& grad_weight,           \
                           const at::Tensor& grad_bias);

METALCORE_DECLARE_CPU_KERNELS(METALCORE_LAYER_NORM_CPU_KERNELS)
