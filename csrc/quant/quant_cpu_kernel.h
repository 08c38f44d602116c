// CPU kernels of the weight-only quantization family (compiled per CPU capability, see
// common/cpu_dispatch.h). Weights come validated and contiguous (quant_format.h); x, grad and
// the outputs are contiguous 2-D tensors with non-zero sizes; bias is undefined or [n].
#pragma once

#include <ATen/core/Tensor.h>

#include "common/cpu_dispatch.h"
#include "quant/quant_format.h"

#define METALCORE_QUANT_CPU_KERNELS                                                        \
  /* out [n, k] (any float dtype) = W. */                                                  \
  void quant_dequantize(const ::metalcore::quant::QWeight& w, const at::Tensor& out);      \
  /* out [m, n] = x [m, k] @ W^T (+ bias), accumulated in float (double for float64 x). */ \
  void quant_linear(const at::Tensor& x, const ::metalcore::quant::QWeight& w,             \
                    const at::Tensor& bias, const at::Tensor& out);                        \
  /* grad_input [m, k] = grad [m, n] @ W. */                                               \
  void quant_linear_backward(const at::Tensor& grad, const ::metalcore::quant::QWeight& w, \
                             const at::Tensor& grad_input);

METALCORE_DECLARE_CPU_KERNELS(METALCORE_QUANT_CPU_KERNELS)
