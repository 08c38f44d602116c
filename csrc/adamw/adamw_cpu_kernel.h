// CPU kernel of the AdamW step (compiled per CPU capability, see common/cpu_dispatch.h). The
// host side has validated the lists, incremented the steps and folded the per-tensor bias
// corrections into TensorWork, so the kernel only streams memory.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "common/cpu_dispatch.h"

namespace metalcore::adamw {

// One parameter's buffers, each a dense block of `numel` elements in the same memory order.
struct TensorWork {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // nullptr unless amsgrad
  int64_t numel;
  at::ScalarType param_dtype;
  at::ScalarType state_dtype;
  double step_size;              // lr / (1 - beta1^step)
  double bias_correction2_sqrt;  // sqrt(1 - beta2^step)
};

struct StepScalars {
  double beta1;
  double beta2;
  double eps;
  double decay;  // 1 - lr * weight_decay
  bool amsgrad;
  bool maximize;
};

}  // namespace metalcore::adamw

#define METALCORE_ADAMW_CPU_KERNELS                                            \
  /* Updates every tensor in one parallel region (chunks may span tensors). */ \
  void adamw_step(const std::vector<::metalcore::adamw::TensorWork>& work,     \
                  const ::metalcore::adamw::StepScalars& scalars);

METALCORE_DECLARE_CPU_KERNELS(METALCORE_ADAMW_CPU_KERNELS)
