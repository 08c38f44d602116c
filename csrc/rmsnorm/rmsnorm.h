// RMSNorm family: input validation and layout shared by every backend's entry point.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "common/checks.h"

namespace metalcore::rmsnorm {

// Validates input/weight/eps for `op` and returns the size of the normalised (last) dim.
// `input_name` is the schema's name of the normalised tensor, so messages name a real argument.
inline int64_t check_inputs(const char* op, const at::Tensor& input,
                            const std::optional<at::Tensor>& weight, double eps,
                            const char* input_name = "input") {
  check_float(op, input_name, input);
  check_dim_at_least(op, input_name, input, 1);
  check_eps(op, eps);
  const int64_t n = input.size(-1);
  if (weight.has_value() && weight->defined()) {
    check_same_device(op, "weight", *weight, input_name, input);
    check_same_dtype(op, "weight", *weight, input_name, input);
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == n, "metalcore.", op,
                      ": 'weight' must have shape [", n, "] (the last dim of '", input_name,
                      "'), got ", weight->sizes());
  }
  return n;
}

// [..., N] -> [rows, N] with unit stride on the last dim; a view when the layout allows it.
inline at::Tensor as_rows(const at::Tensor& t, int64_t n) {
  at::Tensor rows = t.reshape({-1, n});
  if (rows.stride(1) != 1 && rows.size(1) > 1) rows = rows.contiguous();
  return rows;
}

inline at::Tensor weight_or_undefined(const std::optional<at::Tensor>& weight) {
  return weight.has_value() && weight->defined() ? weight->contiguous() : at::Tensor();
}

}  // namespace metalcore::rmsnorm
