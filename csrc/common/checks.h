// Input validation shared by every backend's entry point. Messages always name the op and the
// argument ("metalcore.rmsnorm: 'weight' must ..."), so users see which call and which argument
// was wrong. Argument names are anything streamable: a string, or an element of a list argument
// (adamw's "grads[3]"), formatted only when a check fails.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace metalcore {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

template <typename Arg>
void check_defined(const char* op, const Arg& arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), "metalcore.", op, ": '", arg, "' must be a tensor, got None");
}

// float16, bfloat16, float32 (and float64, used by gradcheck references).
template <typename Arg>
void check_float(const char* op, const Arg& arg, const at::Tensor& t) {
  check_defined(op, arg, t);
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), "metalcore.", op, ": '", arg,
                   "' must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

template <typename Arg, typename Ref>
void check_same_dtype(const char* op, const Arg& arg, const at::Tensor& t, const Ref& ref_arg,
                      const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "metalcore.", op, ": '", arg,
                   "' must have the same dtype as '", ref_arg, "' (", ref.scalar_type(), "), got ",
                   t.scalar_type());
}

template <typename Arg, typename Ref>
void check_same_device(const char* op, const Arg& arg, const at::Tensor& t, const Ref& ref_arg,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "metalcore.", op, ": '", arg,
              "' must be on the same device as '", ref_arg, "' (", ref.device(), "), got ",
              t.device());
}

template <typename Arg, typename Ref>
void check_same_shape(const char* op, const Arg& arg, const at::Tensor& t, const Ref& ref_arg,
                      const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "metalcore.", op, ": '", arg,
                    "' must have the same shape as '", ref_arg, "' ", ref.sizes(), ", got ",
                    t.sizes());
}

inline void check_dim_at_least(const char* op, const char* arg, const at::Tensor& t,
                               int64_t min_dim) {
  TORCH_CHECK_VALUE(t.dim() >= min_dim, "metalcore.", op, ": '", arg, "' must have at least ",
                    min_dim, " dimension(s), got shape ", t.sizes());
}

inline void check_eps(const char* op, double eps) {
  TORCH_CHECK_VALUE(eps >= 0.0, "metalcore.", op, ": 'eps' must be >= 0, got ", eps);
}

}  // namespace metalcore
