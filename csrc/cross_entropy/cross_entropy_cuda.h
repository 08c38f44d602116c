// Launchers of the cross-entropy CUDA kernels (layouts as in cross_entropy_cpu_kernel.h).
#pragma once

#include <ATen/core/Tensor.h>

namespace metalcore::cuda {

void launch_cross_entropy_forward(const at::Tensor& x, const at::Tensor& target,
                                  int64_t ignore_index, double smoothing, const at::Tensor& losses);
void launch_cross_entropy_backward(const at::Tensor& scale, const at::Tensor& x,
                                   const at::Tensor& target, int64_t ignore_index, double smoothing,
                                   const at::Tensor& grad_in);

}  // namespace metalcore::cuda
