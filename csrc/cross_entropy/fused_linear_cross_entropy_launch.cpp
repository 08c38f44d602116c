// fused_linear_cross_entropy on the Metal backend: the shared implementation
// (fused_linear_cross_entropy.h) over the Metal cross_entropy kernels, registered as the
// family's launch layer is: the `metalcore` ops at the MPS key on macOS, the test-only
// `metalcore_msim` ops on Linux (where msim runs the cross-entropy kernels). The matmuls are
// PyTorch's own (MPS matmul on macOS, CPU under msim); no Metal kernel of its own.
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "common/kernel_name.h"
#include "common/metal_registration.h"
#include "cross_entropy/fused_linear_cross_entropy.h"

namespace metalcore::launch {
namespace {

#if defined(METALCORE_METAL_MSIM)
constexpr const char* kNamespace = "metalcore_msim";
#else
constexpr const char* kNamespace = "metalcore";
#endif

using T = at::Tensor;
using OptT = std::optional<at::Tensor>;

T fused_linear_cross_entropy(const T& input, const T& weight, const T& target, const OptT& bias,
                             int64_t ignore_index, c10::string_view reduction,
                             double label_smoothing) {
  // Metal's own limit first, under this op's name (the cross_entropy ops it calls would name
  // themselves).
  check_metal_dtype("fused_linear_cross_entropy", "input", input.scalar_type());
  return flce::forward(kNamespace, input, weight, target, bias, ignore_index, reduction,
                       label_smoothing);
}

std::tuple<T, T, T> fused_linear_cross_entropy_backward(const T& grad_loss, const T& input,
                                                        const T& weight, const T& target,
                                                        const OptT& bias, int64_t ignore_index,
                                                        c10::string_view reduction,
                                                        double label_smoothing) {
  check_metal_dtype("fused_linear_cross_entropy_backward", "input", input.scalar_type());
  return flce::backward(kNamespace, grad_loss, input, weight, target, bias, ignore_index, reduction,
                        label_smoothing);
}

}  // namespace

METALCORE_METAL_IMPL(m) {
  m.impl("fused_linear_cross_entropy", &fused_linear_cross_entropy);
  m.impl("fused_linear_cross_entropy_backward", &fused_linear_cross_entropy_backward);
}

}  // namespace metalcore::launch
