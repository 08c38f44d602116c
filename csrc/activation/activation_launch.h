// Metal launch layer of the activation family: same signatures as the ops, plus the Encoder.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <string>
#include <tuple>
#include <vector>

#include "common/encoder.h"

namespace metalcore::launch {

at::Tensor silu(Encoder& enc, const at::Tensor& input);
at::Tensor silu_backward(Encoder& enc, const at::Tensor& grad_out, const at::Tensor& input);
at::Tensor gelu(Encoder& enc, const at::Tensor& input, c10::string_view approximate);
at::Tensor gelu_backward(Encoder& enc, const at::Tensor& grad_out, const at::Tensor& input,
                         c10::string_view approximate);
at::Tensor swiglu(Encoder& enc, const at::Tensor& gate, const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> swiglu_backward(Encoder& enc, const at::Tensor& grad_out,
                                                   const at::Tensor& gate, const at::Tensor& up);

std::vector<std::string> activation_kernel_names();

}  // namespace metalcore::launch
