// Metal launch layer of the fused AdamW step: same signature as the op, plus the Encoder.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "common/encoder.h"

namespace metalcore::launch {

void adamw(Encoder& enc, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
           const at::Tensor& lr, double beta1, double beta2, double weight_decay, double eps,
           bool amsgrad, bool maximize);

std::vector<std::string> adamw_kernel_names();

}  // namespace metalcore::launch
