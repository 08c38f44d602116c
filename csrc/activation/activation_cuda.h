// Launchers of the activation CUDA kernels: contiguous operands of one shape and dtype.
#pragma once

#include <ATen/core/Tensor.h>

namespace metalcore::cuda {

void launch_silu(const at::Tensor& in, const at::Tensor& out);
void launch_silu_backward(const at::Tensor& grad_out, const at::Tensor& in,
                          const at::Tensor& grad_in);
void launch_gelu(const at::Tensor& in, bool tanh_approx, const at::Tensor& out);
void launch_gelu_backward(const at::Tensor& grad_out, const at::Tensor& in, bool tanh_approx,
                          const at::Tensor& grad_in);
void launch_swiglu(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out);
void launch_swiglu_backward(const at::Tensor& grad_out, const at::Tensor& gate,
                            const at::Tensor& up, const at::Tensor& grad_gate,
                            const at::Tensor& grad_up);

}  // namespace metalcore::cuda
