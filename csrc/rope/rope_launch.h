// Metal launch layer of RoPE: same signatures as the ops, plus the Encoder.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>
#include <vector>

#include "common/encoder.h"

namespace metalcore::launch {

std::tuple<at::Tensor, at::Tensor> rope(Encoder& enc, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& cos, const at::Tensor& sin,
                                        bool interleaved);
std::tuple<at::Tensor, at::Tensor> rope_backward(Encoder& enc, const at::Tensor& grad_q_out,
                                                 const at::Tensor& grad_k_out,
                                                 const at::Tensor& cos, const at::Tensor& sin,
                                                 bool interleaved);

std::vector<std::string> rope_kernel_names();

}  // namespace metalcore::launch
