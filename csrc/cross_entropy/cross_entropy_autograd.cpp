// Autograd of the cross-entropy family: backward calls metalcore::cross_entropy_backward.
//
// Forward-mode tangent: the loss is a sum over rows of functions of one row each, with gradient
// G = cross_entropy_backward(1, input, target, ...) (the per-row scale of the reduction included),
// so its tangent is sum_j G[i, j] t[i, j] per row ('none') or over everything ('sum', 'mean').
#include <torch/library.h>

#include <string>

#include "common/autograd_util.h"

namespace metalcore {
namespace {

using T = at::Tensor;
using S = c10::string_view;

const auto& cross_entropy_op() {
  static const auto op = op_handle<T(const T&, const T&, int64_t, S, double)>("cross_entropy");
  return op;
}
const auto& cross_entropy_backward_op() {
  static const auto op =
      op_handle<T(const T&, const T&, const T&, int64_t, S, double)>("cross_entropy_backward");
  return op;
}

struct CrossEntropyBackward : OpNode<CrossEntropyBackward> {
  static constexpr const char* kName = "MetalcoreCrossEntropyBackward";
  SavedVariable input_, target_;
  int64_t ignore_index_ = -100;
  std::string reduction_;
  double label_smoothing_ = 0.0;
  template <typename V>
  void visit(V&& v) {
    v(input_, false);
    v(target_, false);
    v(ignore_index_);
    v(reduction_);
    v(label_smoothing_);
  }
  variable_list backward(variable_list& grads) {
    if (!grads[0].defined()) return {T()};
    return {cross_entropy_backward_op().call(grads[0], input_.unpack(), target_.unpack(),
                                             ignore_index_, reduction_, label_smoothing_)};
  }
};

T cross_entropy_autograd(const T& input, const T& target, int64_t ignore_index, S reduction,
                         double label_smoothing) {
  const bool grad = any_requires_grad({input});
  const T t_input = tangent_of(input);
  if (!grad && !t_input.defined()) {
    return call_below(cross_entropy_op(), input, target, ignore_index, reduction, label_smoothing);
  }
  T out = call_below(cross_entropy_op(), input, target, ignore_index, reduction, label_smoothing);
  if (grad) {
    auto node = new_node<CrossEntropyBackward>(input);
    node->input_ = SavedVariable(input, false);
    node->target_ = SavedVariable(target, false);
    node->ignore_index_ = ignore_index;
    node->reduction_ = std::string(reduction);
    node->label_smoothing_ = label_smoothing;
    torch::autograd::set_history(out, node);
  }
  if (t_input.defined()) {
    T tangent;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      const T ones = at::ones_like(out);
      const T g = cross_entropy_backward_op().call(ones, input, target, ignore_index, reduction,
                                                   label_smoothing);
      tangent = reduction == "none" ? (g * t_input).sum(1) : (g * t_input).sum();
    }
    set_tangent("cross_entropy", out, tangent, {t_input, input});
  }
  return out;
}

T cross_entropy_backward_autograd(const T& grad_loss, const T& input, const T& target,
                                  int64_t ignore_index, S reduction, double label_smoothing) {
  return call_backward_op("cross_entropy_backward", "cross_entropy", cross_entropy_backward_op(),
                          {grad_loss, input}, grad_loss, input, target, ignore_index, reduction,
                          label_smoothing);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, Autograd, m) {
  m.impl("cross_entropy", &cross_entropy_autograd);
  m.impl("cross_entropy_backward", &cross_entropy_backward_autograd);
}

}  // namespace metalcore
