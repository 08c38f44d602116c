// Host names of the Metal kernels: "<family>_<variant>_<dtype>", the scheme the instantiation
// macro METALCORE_HOST_NAME (kernels/common/utils.h) spells on the Metal side.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <string>

namespace metalcore {

inline bool metal_supports(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline const char* dtype_token(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "float32";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    default:
      TORCH_CHECK_TYPE(false, "metalcore: no Metal kernels for dtype ", t);
  }
}

inline std::string kernel_name(const std::string& family, const std::string& variant,
                               at::ScalarType dtype) {
  return family + "_" + variant + "_" + dtype_token(dtype);
}

// float64 exists on CPU (gradcheck references) but not in Metal: reject it with the op's name.
template <typename Arg>
void check_metal_dtype(const char* op, const Arg& arg, at::ScalarType t) {
  TORCH_CHECK_TYPE(metal_supports(t), "metalcore.", op, ": '", arg,
                   "' must be float16, bfloat16 or float32 on the Metal backend, got ", t);
}

}  // namespace metalcore
