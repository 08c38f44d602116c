// Launchers of the softmax CUDA kernels: contiguous [outer, n, inner] tensors of one dtype.
#pragma once

#include <ATen/core/Tensor.h>

namespace metalcore::cuda {

void launch_softmax_forward(const at::Tensor& x, bool log, const at::Tensor& out);
void launch_softmax_backward(const at::Tensor& grad_out, const at::Tensor& y, bool log,
                             const at::Tensor& grad_in);

}  // namespace metalcore::cuda
