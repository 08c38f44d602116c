// Activation family: validation shared by every backend's entry point.
#pragma once

#include <ATen/ATen.h>

#include <string_view>

#include "common/checks.h"

namespace metalcore::activation {

// Returns true for 'tanh', false for 'none' (torch.nn.functional.gelu's two modes).
inline bool parse_approximate(const char* op, std::string_view approximate) {
  TORCH_CHECK_VALUE(approximate == "none" || approximate == "tanh", "metalcore.", op,
                    ": 'approximate' must be 'none' or 'tanh', got '", approximate, "'");
  return approximate == "tanh";
}

// grad_out and every extra operand must match `input` in device, dtype and shape.
inline void check_like(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                       const at::Tensor& ref) {
  check_float(op, arg, t);
  check_same_device(op, arg, t, ref_arg, ref);
  check_same_dtype(op, arg, t, ref_arg, ref);
  check_same_shape(op, arg, t, ref_arg, ref);
}

}  // namespace metalcore::activation
