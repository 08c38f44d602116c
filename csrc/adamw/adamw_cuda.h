// Launcher of the AdamW CUDA kernel: lists of contiguous CUDA tensors, already validated; steps
// on the CPU were already incremented by the caller (the kernel increments device steps).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace metalcore::cuda {

struct AdamwHyper {
  const void* lr_ptr;  // device lr, or nullptr: use lr
  double lr;
  bool lr_double;
  bool step_double;
  double beta1, beta2, wd, eps;
  bool amsgrad, maximize;
};

void launch_adamw(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                  const std::vector<at::Tensor>& exp_avgs,
                  const std::vector<at::Tensor>& exp_avg_sqs,
                  const std::vector<at::Tensor>& max_exp_avg_sqs,
                  const std::vector<at::Tensor>& state_steps, const AdamwHyper& hp);

}  // namespace metalcore::cuda
