// Autograd of fused_linear_cross_entropy, and its CPU and CUDA kernels (the shared
// implementation of fused_linear_cross_entropy.h over the metalcore::cross_entropy ops). The
// backward node calls metalcore::fused_linear_cross_entropy_backward.
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "common/autograd_util.h"
#include "cross_entropy/fused_linear_cross_entropy.h"

namespace metalcore {
namespace {

using flce::kBackwardOp;
using flce::kOp;
using T = at::Tensor;
using OptT = std::optional<at::Tensor>;
using S = c10::string_view;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

const auto& flce_op() {
  static const auto op =
      op_handle<T(const T&, const T&, const T&, const OptT&, int64_t, S, double)>(kOp);
  return op;
}
const auto& flce_backward_op() {
  static const auto op =
      op_handle<Triple(const T&, const T&, const T&, const T&, const OptT&, int64_t, S, double)>(
          kBackwardOp);
  return op;
}

struct FusedLinearCrossEntropyBackward : OpNode<FusedLinearCrossEntropyBackward> {
  static constexpr const char* kName = "MetalcoreFusedLinearCrossEntropyBackward";
  SavedVariable input_, weight_, target_, bias_;
  int64_t ignore_index_ = -100;
  std::string reduction_;
  double label_smoothing_ = 0.0;
  template <typename V>
  void visit(V&& v) {
    v(input_, false);
    v(weight_, false);
    v(target_, false);
    v(bias_, false);
    v(ignore_index_);
    v(reduction_);
    v(label_smoothing_);
  }
  variable_list backward(variable_list& grads) {
    if (!grads[0].defined()) return {T(), T(), T()};
    const T bias = bias_.unpack();
    auto [gi, gw, gb] = flce_backward_op().call(
        grads[0], input_.unpack(), weight_.unpack(), target_.unpack(),
        bias.defined() ? OptT(bias) : std::nullopt, ignore_index_, reduction_, label_smoothing_);
    return {gi, gw, bias.defined() ? gb : T()};
  }
};

T flce_autograd(const T& input, const T& weight, const T& target, const OptT& bias,
                int64_t ignore_index, S reduction, double label_smoothing) {
  const T b = bias.value_or(T());
  TORCH_CHECK(!any_has_tangent({input, weight, b}), "metalcore.", kOp,
              ": forward-mode AD (jvp) is not supported; compute the logits with a matmul and "
              "use metalcore.cross_entropy instead");
  const bool grad = any_requires_grad({input, weight, b});
  T out =
      call_below(flce_op(), input, weight, target, bias, ignore_index, reduction, label_smoothing);
  if (grad) {
    auto node = new_node<FusedLinearCrossEntropyBackward>(input, weight, b);
    node->input_ = SavedVariable(input, false);
    node->weight_ = SavedVariable(weight, false);
    node->target_ = SavedVariable(target, false);
    node->bias_ = SavedVariable(b, false);
    node->ignore_index_ = ignore_index;
    node->reduction_ = std::string(reduction);
    node->label_smoothing_ = label_smoothing;
    torch::autograd::set_history(out, node);
  }
  return out;
}

Triple flce_backward_autograd(const T& grad_loss, const T& input, const T& weight, const T& target,
                              const OptT& bias, int64_t ignore_index, S reduction,
                              double label_smoothing) {
  return call_backward_op(kBackwardOp, kOp, flce_backward_op(),
                          {grad_loss, input, weight, bias.value_or(T())}, grad_loss, input, weight,
                          target, bias, ignore_index, reduction, label_smoothing);
}

T forward_kernel(const T& input, const T& weight, const T& target, const OptT& bias,
                 int64_t ignore_index, S reduction, double label_smoothing) {
  return flce::forward("metalcore", input, weight, target, bias, ignore_index, reduction,
                       label_smoothing);
}

Triple backward_kernel(const T& grad_loss, const T& input, const T& weight, const T& target,
                       const OptT& bias, int64_t ignore_index, S reduction,
                       double label_smoothing) {
  return flce::backward("metalcore", grad_loss, input, weight, target, bias, ignore_index,
                        reduction, label_smoothing);
}

void register_backend(torch::Library& m) {
  m.impl(kOp, &forward_kernel);
  m.impl(kBackwardOp, &backward_kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CPU, m) { register_backend(m); }
TORCH_LIBRARY_IMPL(metalcore, CUDA, m) { register_backend(m); }

TORCH_LIBRARY_IMPL(metalcore, Autograd, m) {
  m.impl(kOp, &flce_autograd);
  m.impl(kBackwardOp, &flce_backward_autograd);
}

}  // namespace metalcore
