// Launchers of the RMSNorm CUDA kernels. Inputs are [rows, n] with a unit stride on n; outputs
// are contiguous; `residual`/`residual_out`/`weight`/`grad_res` may be undefined.
#pragma once

#include <ATen/core/Tensor.h>

namespace metalcore::cuda {

void launch_forward(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                    double eps, const at::Tensor& out, const at::Tensor& residual_out);

void launch_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& grad_res, double eps, const at::Tensor& dx,
                     const at::Tensor& dw);

}  // namespace metalcore::cuda
