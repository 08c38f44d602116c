// Launchers of the quantization family's CUDA kernels (quant_cuda.cu). The weight comes
// validated and contiguous (quant_format.h); x, grad and outputs are contiguous and non-empty.
#pragma once

#include <ATen/core/Tensor.h>

#include "quant/quant_format.h"

namespace metalcore::cuda {

void quant_dequantize(const quant::QWeight& w, const at::Tensor& out);
void quant_linear(const at::Tensor& x, const quant::QWeight& w, const at::Tensor& bias,
                  const at::Tensor& out);
void quant_linear_backward(const at::Tensor& grad, const quant::QWeight& w,
                           const at::Tensor& grad_input);

}  // namespace metalcore::cuda
