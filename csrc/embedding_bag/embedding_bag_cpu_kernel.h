// CPU kernels of the embedding_bag family (compiled per CPU capability, see
// common/cpu_dispatch.h). The layouts are the entry points' (embedding_bag.h): weight [V, D] and
// grad_out [B, D] contiguous, indices [N] and bounds [B + 1] contiguous int64, optional tensors
// undefined; mode is embedding_bag::Mode as an integer.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/cpu_dispatch.h"

#define METALCORE_EMBEDDING_BAG_CPU_KERNELS                                                      \
  /* out [B, D]. */                                                                              \
  void embedding_bag_forward(const at::Tensor& weight, const at::Tensor& indices,                \
                             const at::Tensor& bounds, int64_t mode, const at::Tensor& psw,      \
                             int64_t padding_idx, const at::Tensor& out);                        \
  /* grad_weight [V, D] (every row written), grad_psw [N] when defined. */                       \
  void embedding_bag_backward(const at::Tensor& grad_out, const at::Tensor& weight,              \
                              const at::Tensor& indices, const at::Tensor& bounds, int64_t mode, \
                              const at::Tensor& psw, int64_t padding_idx,                        \
                              const at::Tensor& grad_weight, const at::Tensor& grad_psw);

METALCORE_DECLARE_CPU_KERNELS(METALCORE_EMBEDDING_BAG_CPU_KERNELS)
