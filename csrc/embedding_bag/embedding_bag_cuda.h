// Launchers of the embedding_bag CUDA kernels. Layouts are the entry points' (embedding_bag.h):
// weight [V, D] and grad_out [B, D] contiguous, indices [N] and bounds [B + 1] contiguous int64,
// psw [N] or undefined, padding_idx in [0, V) or -1; mode is embedding_bag::Mode as an integer.
#pragma once

#include <ATen/core/Tensor.h>

namespace metalcore::cuda {

void launch_embedding_bag_forward(const at::Tensor& weight, const at::Tensor& indices,
                                  const at::Tensor& bounds, int64_t mode, const at::Tensor& psw,
                                  int64_t padding_idx, const at::Tensor& out);

void launch_embedding_bag_backward(const at::Tensor& grad_out, const at::Tensor& weight,
                                   const at::Tensor& indices, const at::Tensor& bounds,
                                   int64_t mode, const at::Tensor& psw, int64_t padding_idx,
                                   const at::Tensor& grad_weight, const at::Tensor& grad_psw);

}  // namespace metalcore::cuda
