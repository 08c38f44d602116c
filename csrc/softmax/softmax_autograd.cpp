// Autograd of the softmax family: backward calls metalcore::softmax_backward /
// metalcore::log_softmax_backward, which take the forward's output (not its input).
//
// Forward-mode tangents: softmax's Jacobian diag(y) - y y^T is symmetric, so J t =
// softmax_backward(t, y). log_softmax's, I - 1 softmax^T, is not: J t = t - sum(exp(y) * t),
// computed with plain ops below autograd.
#include <torch/library.h>

#include "common/autograd_util.h"

namespace metalcore {
namespace {

using T = at::Tensor;

const auto& softmax_op() {
  static const auto op = op_handle<T(const T&, int64_t)>("softmax");
  return op;
}
const auto& log_softmax_op() {
  static const auto op = op_handle<T(const T&, int64_t)>("log_softmax");
  return op;
}
const auto& softmax_backward_op() {
  static const auto op = op_handle<T(const T&, const T&, int64_t)>("softmax_backward");
  return op;
}
const auto& log_softmax_backward_op() {
  static const auto op = op_handle<T(const T&, const T&, int64_t)>("log_softmax_backward");
  return op;
}

// One node type for both ops: the backward needs only the output and the dim.
template <bool Log>
struct SoftmaxBackward : OpNode<SoftmaxBackward<Log>> {
  static constexpr const char* kName =
      Log ? "MetalcoreLogSoftmaxBackward" : "MetalcoreSoftmaxBackward";
  SavedVariable output_;
  int64_t dim_ = 0;
  template <typename V>
  void visit(V&& v) {
    v(output_, true);
    v(dim_);
  }
  variable_list backward(variable_list& grads) {
    if (!grads[0].defined()) return {T()};
    const T output = output_.unpack(self_ptr(this));
    const auto& op = Log ? log_softmax_backward_op() : softmax_backward_op();
    return {op.call(grads[0], output, dim_)};
  }
};

template <bool Log>
T softmax_autograd(const T& input, int64_t dim) {
  const auto& op = Log ? log_softmax_op() : softmax_op();
  const bool grad = any_requires_grad({input});
  const T t_input = tangent_of(input);
  if (!grad && !t_input.defined()) return call_below(op, input, dim);
  T out = call_below(op, input, dim);
  decltype(new_node<SoftmaxBackward<Log>>(input)) node;
  if (grad) {
    node = new_node<SoftmaxBackward<Log>>(input);
    node->dim_ = dim;
    torch::autograd::set_history(out, node);
  }
  if (t_input.defined()) {
    T tangent;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      if (Log) {
        // A 0-dim input has one element: its log_softmax is constant (0), as is the tangent.
        const int64_t d = input.dim() == 0 ? 0 : dim;
        const T t = input.dim() == 0 ? t_input.reshape({1}) : t_input;
        const T y = input.dim() == 0 ? out.reshape({1}) : out;
        tangent = (t - (y.exp() * t).sum(d, /*keepdim=*/true)).reshape(t_input.sizes());
      } else {
        tangent = softmax_backward_op().call(t_input, out, dim);
      }
    }
    set_tangent(Log ? "log_softmax" : "softmax", out, tangent, {t_input, input});
  }
  // Saved after its tangent is set (see fused_add_rmsnorm_autograd).
  if (node) node->output_ = SavedVariable(out, true);
  return out;
}

T softmax_backward_autograd(const T& grad_out, const T& output, int64_t dim) {
  return call_backward_op("softmax_backward", "softmax", softmax_backward_op(), {grad_out, output},
                          grad_out, output, dim);
}

T log_softmax_backward_autograd(const T& grad_out, const T& output, int64_t dim) {
  return call_backward_op("log_softmax_backward", "log_softmax", log_softmax_backward_op(),
                          {grad_out, output}, grad_out, output, dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, Autograd, m) {
  m.impl("softmax", &softmax_autograd<false>);
  m.impl("log_softmax", &softmax_autograd<true>);
  m.impl("softmax_backward", &softmax_backward_autograd);
  m.impl("log_softmax_backward", &log_softmax_backward_autograd);
}

}  // namespace metalcore
