// Launchers of the LayerNorm CUDA kernels. Inputs are [rows, n] with a unit stride on n; outputs
// are contiguous; residual / residual_out / weight / bias / grad_res may be undefined, and
// dw / db are undefined when no weight / bias gradient is wanted.
#pragma once

#include <ATen/core/Tensor.h>

namespace metalcore::cuda {

void launch_layer_norm_forward(const at::Tensor& x, const at::Tensor& residual,
                               const at::Tensor& weight, const at::Tensor& bias, double eps,
                               const at::Tensor& out, const at::Tensor& residual_out);

void launch_layer_norm_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& grad_res, double eps, const at::Tensor& dx,
                                const at::Tensor& dw, const at::Tensor& db);

}  // namespace metalcore::cuda
