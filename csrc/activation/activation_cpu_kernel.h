// CPU kernels of the activation family (compiled per CPU capability). All tensors contiguous
// and of equal numel and dtype.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/cpu_dispatch.h"

#define METALCORE_ACTIVATION_CPU_KERNELS                                                         \
  void silu_forward(const at::Tensor& x, const at::Tensor& out);                                 \
  void silu_backward(const at::Tensor& grad_out, const at::Tensor& x,                            \
                     const at::Tensor& grad_input);                                              \
  void gelu_forward(const at::Tensor& x, bool tanh_approx, const at::Tensor& out);               \
  void gelu_backward(const at::Tensor& grad_out, const at::Tensor& x, bool tanh_approx,          \
                     const at::Tensor& grad_input);                                              \
  void swiglu_forward(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out);      \
  void swiglu_backward(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& up, \
                       const at::Tensor& grad_gate, const at::Tensor& grad_up);

METALCORE_DECLARE_CPU_KERNELS(METALCORE_ACTIVATION_CPU_KERNELS)
