// Metal launch layer of the RMSNorm family: same signatures as the ops, plus the Encoder that
// records the dispatches (Metal on macOS, msim in the Linux tests).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/encoder.h"

namespace metalcore::launch {

at::Tensor rmsnorm(Encoder& enc, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                   double eps);
std::tuple<at::Tensor, at::Tensor> rmsnorm_backward(Encoder& enc, const at::Tensor& grad_out,
                                                    const at::Tensor& input,
                                                    const std::optional<at::Tensor>& weight,
                                                    double eps);
std::tuple<at::Tensor, at::Tensor> fused_add_rmsnorm(Encoder& enc, const at::Tensor& input,
                                                     const at::Tensor& residual,
                                                     const std::optional<at::Tensor>& weight,
                                                     double eps);
std::tuple<at::Tensor, at::Tensor> fused_add_rmsnorm_backward(
    Encoder& enc, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& residual_out, const std::optional<at::Tensor>& weight, double eps);

// Every host name these launchers can select.
std::vector<std::string> rmsnorm_kernel_names();

}  // namespace metalcore::launch
