// Autograd of lora_linear: the forward redispatches below autograd, the backward calls
// metalcore::lora_linear_backward, asking for the base weight's gradient only when the weight
// requires grad (a frozen base, the usual LoRA fine-tune, skips its [out, in] product).
//
// Forward-mode tangents: the op is bilinear in (input, weight) and (input, lora_a, lora_b), so
// the tangent is lora_linear(t_x, W, A, B, s) + t_x-free terms: x @ t_W^T + s (x @ t_A^T) @ B^T
// + s (x @ A^T) @ t_B^T + t_bias, each a plain product of the given tensors (below autograd).
#include <torch/library.h>

#include "common/autograd_util.h"

namespace metalcore {
namespace {

using T = at::Tensor;
using OptT = std::optional<at::Tensor>;
using Grads = std::tuple<T, T, T, T, T>;

const auto& forward_op() {
  static const auto op =
      op_handle<T(const T&, const T&, const T&, const T&, double, const OptT&)>("lora_linear");
  return op;
}
const auto& backward_op() {
  static const auto op =
      op_handle<Grads(const T&, const T&, const T&, const T&, const T&, double, const OptT&, bool)>(
          "lora_linear_backward");
  return op;
}

OptT opt(const T& t) { return t.defined() ? OptT(t) : std::nullopt; }

struct LoraLinearBackward : OpNode<LoraLinearBackward> {
  static constexpr const char* kName = "MetalcoreLoraLinearBackward";
  // The bias only tells the backward op to compute grad_bias.
  SavedVariable input_, weight_, lora_a_, lora_b_, bias_;
  double scaling_ = 1.0;
  bool weight_grad_ = false;
  template <typename V>
  void visit(V&& v) {
    v(input_, false);
    v(weight_, false);
    v(lora_a_, false);
    v(lora_b_, false);
    v(bias_, false);
    v(scaling_);
    v(weight_grad_);
  }
  variable_list backward(variable_list& grads) {
    if (!grads[0].defined()) return {T(), T(), T(), T(), T()};
    const T bias = bias_.unpack();
    auto [gx, gw, ga, gb, gbias] =
        backward_op().call(grads[0], input_.unpack(), weight_.unpack(), lora_a_.unpack(),
                           lora_b_.unpack(), scaling_, opt(bias), weight_grad_);
    return {gx, weight_grad_ ? gw : T(), ga, gb, bias.defined() ? gbias : T()};
  }
};

// The tangent for tangents t_x, t_w, t_a, t_b, t_bias (any may be undefined), below autograd.
T lora_tangent(const T& x, const T& w, const T& a, const T& b, double s, const T& t_x, const T& t_w,
               const T& t_a, const T& t_b, const T& t_bias) {
  at::AutoDispatchBelowADInplaceOrView guard;
  T tangent;
  auto add = [&](const T& part) { tangent = tangent.defined() ? tangent + part : part; };
  if (t_x.defined()) add(forward_op().call(t_x, w, a, b, s, std::nullopt));
  if (t_w.defined()) add(at::matmul(x, t_w.t()));
  if (t_a.defined()) add(at::matmul(at::matmul(x, t_a.t()), b.t()) * s);
  if (t_b.defined()) add(at::matmul(at::matmul(x, a.t()), t_b.t()) * s);
  if (t_bias.defined()) add(t_bias.expand_as(tangent.defined() ? tangent : at::matmul(x, w.t())));
  return tangent.contiguous();
}

T lora_linear_autograd(const T& input, const T& weight, const T& lora_a, const T& lora_b,
                       double scaling, const OptT& bias) {
  const T bias_t = bias.value_or(T());
  const bool grad = any_requires_grad({input, weight, lora_a, lora_b, bias_t});
  const T t_x = tangent_of(input), t_w = tangent_of(weight), t_a = tangent_of(lora_a);
  const T t_b = tangent_of(lora_b), t_bias = tangent_of(bias_t);
  const bool fw =
      t_x.defined() || t_w.defined() || t_a.defined() || t_b.defined() || t_bias.defined();
  T out = call_below(forward_op(), input, weight, lora_a, lora_b, scaling, bias);
  if (!grad && !fw) return out;
  if (grad) {
    auto node = new_node<LoraLinearBackward>(input, weight, lora_a, lora_b, bias_t);
    node->input_ = SavedVariable(input, false);
    node->weight_ = SavedVariable(weight, false);
    node->lora_a_ = SavedVariable(lora_a, false);
    node->lora_b_ = SavedVariable(lora_b, false);
    node->bias_ = SavedVariable(bias_t, false);
    node->scaling_ = scaling;
    node->weight_grad_ = weight.requires_grad();
    torch::autograd::set_history(out, node);
  }
  if (fw) {
    set_tangent("lora_linear", out,
                lora_tangent(input, weight, lora_a, lora_b, scaling, t_x, t_w, t_a, t_b, t_bias),
                {t_x, t_w, t_a, t_b, t_bias, input, weight, lora_a, lora_b});
  }
  return out;
}

Grads lora_linear_backward_autograd(const T& grad_out, const T& input, const T& weight,
                                    const T& lora_a, const T& lora_b, double scaling,
                                    const OptT& bias, bool weight_grad) {
  return call_backward_op("lora_linear_backward", "lora_linear", backward_op(),
                          {grad_out, input, weight, lora_a, lora_b, bias.value_or(T())}, grad_out,
                          input, weight, lora_a, lora_b, scaling, bias, weight_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, Autograd, m) {
  m.impl("lora_linear", &lora_linear_autograd);
  m.impl("lora_linear_backward", &lora_linear_backward_autograd);
}

}  // namespace metalcore
