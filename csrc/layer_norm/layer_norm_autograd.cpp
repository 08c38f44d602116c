// Autograd of the LayerNorm family: forward redispatches below autograd, backward calls
// metalcore::layer_norm_backward / metalcore::fused_add_layer_norm_backward.
//
// Forward-mode tangents come from the same ops. With n(x) = layer_norm(x, None, None) and
// y = n(x) * w + b, the tangent is J_n(x) t_x * w + n(x) * t_w + t_b, and
// J_n = r (I - 1 1^T / N - xhat xhat^T / N) (r = 1/sqrt(var + eps), xhat = (x - mean) r) is
// symmetric, so J_n t_x = layer_norm_backward(t_x, x, None, None)[0]. fused_add_layer_norm
// normalises h = x + residual, whose tangent is t_x + t_residual.
#include <torch/library.h>

#include "common/autograd_util.h"

namespace metalcore {
namespace {

using T = at::Tensor;
using OptT = std::optional<at::Tensor>;
using Pair = std::tuple<at::Tensor, at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

const auto& layer_norm_op() {
  static const auto op = op_handle<T(const T&, const OptT&, const OptT&, double)>("layer_norm");
  return op;
}
const auto& layer_norm_backward_op() {
  static const auto op = op_handle<Triple(const T&, const T&, const OptT&, const OptT&, double)>(
      "layer_norm_backward");
  return op;
}
const auto& fused_add_op() {
  static const auto op =
      op_handle<Pair(const T&, const T&, const OptT&, const OptT&, double)>("fused_add_layer_norm");
  return op;
}
const auto& fused_add_backward_op() {
  static const auto op =
      op_handle<Triple(const T&, const OptT&, const T&, const OptT&, const OptT&, double)>(
          "fused_add_layer_norm_backward");
  return op;
}

OptT opt(const T& t) { return t.defined() ? OptT(t) : std::nullopt; }

struct LayerNormBackward : OpNode<LayerNormBackward> {
  static constexpr const char* kName = "MetalcoreLayerNormBackward";
  // The bias only tells the backward op to compute grad_bias; saving it copies nothing.
  SavedVariable input_, weight_, bias_;
  double eps_ = 0.0;
  template <typename V>
  void visit(V&& v) {
    v(input_, false);
    v(weight_, false);
    v(bias_, false);
    v(eps_);
  }
  variable_list backward(variable_list& grads) {
    if (!grads[0].defined()) return {T(), T(), T()};
    const T weight = weight_.unpack(), bias = bias_.unpack();
    auto [grad_input, grad_weight, grad_bias] =
        layer_norm_backward_op().call(grads[0], input_.unpack(), opt(weight), opt(bias), eps_);
    return {grad_input, weight.defined() ? grad_weight : T(), bias.defined() ? grad_bias : T()};
  }
};

struct FusedAddLayerNormBackward : OpNode<FusedAddLayerNormBackward> {
  static constexpr const char* kName = "MetalcoreFusedAddLayerNormBackward";
  // The backward needs only the summed residual (an output), not input and residual apart.
  SavedVariable residual_out_, weight_, bias_;
  double eps_ = 0.0;
  template <typename V>
  void visit(V&& v) {
    v(residual_out_, true);
    v(weight_, false);
    v(bias_, false);
    v(eps_);
  }
  variable_list backward(variable_list& grads) {
    // An unused output's gradient is undefined rather than a materialised zero tensor.
    if (!grads[0].defined() && !grads[1].defined()) return {T(), T(), T(), T()};
    const T residual_out = residual_out_.unpack(self_ptr(this));
    const T weight = weight_.unpack(), bias = bias_.unpack();
    const T grad_out = grads[0].defined() ? grads[0] : at::zeros_like(residual_out);
    auto [grad_x, grad_weight, grad_bias] = fused_add_backward_op().call(
        grad_out, opt(grads[1]), residual_out, opt(weight), opt(bias), eps_);
    // d(input + residual)/d input = d/d residual = identity.
    return {grad_x, grad_x, weight.defined() ? grad_weight : T(), bias.defined() ? grad_bias : T()};
  }
};

// The tangent of layer_norm(x, weight, bias) for tangents t_x, t_w, t_b (any may be undefined),
// below autograd (see set_tangent).
T layer_norm_tangent(const T& x, const T& weight, double eps, const T& t_x, const T& t_w,
                     const T& t_b) {
  at::AutoDispatchBelowADInplaceOrView guard;
  T tangent;
  auto add = [&](const T& part) { tangent = tangent.defined() ? tangent + part : part; };
  if (t_x.defined()) {
    T part = std::get<0>(layer_norm_backward_op().call(t_x, x, std::nullopt, std::nullopt, eps));
    add(weight.defined() ? part * weight : part);
  }
  if (t_w.defined()) add(layer_norm_op().call(x, std::nullopt, std::nullopt, eps) * t_w);
  if (t_b.defined()) add(t_b.expand(x.sizes()).clone(at::MemoryFormat::Contiguous));
  return tangent;
}

T layer_norm_autograd(const T& input, const OptT& weight, const OptT& bias, double eps) {
  const T w = weight.value_or(T()), b = bias.value_or(T());
  const bool grad = any_requires_grad({input, w, b});
  const T t_input = tangent_of(input), t_w = tangent_of(w), t_b = tangent_of(b);
  const bool fw = t_input.defined() || t_w.defined() || t_b.defined();
  if (!grad && !fw) return call_below(layer_norm_op(), input, weight, bias, eps);
  T out = call_below(layer_norm_op(), input, weight, bias, eps);
  if (grad) {
    auto node = new_node<LayerNormBackward>(input, w, b);
    node->input_ = SavedVariable(input, false);
    node->weight_ = SavedVariable(w, false);
    node->bias_ = SavedVariable(b, false);
    node->eps_ = eps;
    torch::autograd::set_history(out, node);
  }
  if (fw) {
    set_tangent("layer_norm", out, layer_norm_tangent(input, w, eps, t_input, t_w, t_b),
                {t_input, t_w, t_b, input, w});
  }
  return out;
}

Pair fused_add_layer_norm_autograd(const T& input, const T& residual, const OptT& weight,
                                   const OptT& bias, double eps) {
  const T w = weight.value_or(T()), b = bias.value_or(T());
  const bool grad = any_requires_grad({input, residual, w, b});
  const T t_input = tangent_of(input), t_res = tangent_of(residual);
  const T t_w = tangent_of(w), t_b = tangent_of(b);
  const bool fw = t_input.defined() || t_res.defined() || t_w.defined() || t_b.defined();
  if (!grad && !fw) return call_below(fused_add_op(), input, residual, weight, bias, eps);
  auto [out, residual_out] = call_below(fused_add_op(), input, residual, weight, bias, eps);
  decltype(new_node<FusedAddLayerNormBackward>(input, residual, w, b)) node;
  if (grad) {
    node = new_node<FusedAddLayerNormBackward>(input, residual, w, b);
    node->weight_ = SavedVariable(w, false);
    node->bias_ = SavedVariable(b, false);
    node->eps_ = eps;
    torch::autograd::set_history(out, node);
    torch::autograd::set_history(residual_out, node);
  }
  if (fw) {
    // residual_out = input + residual is linear; a single tangent is copied so that an in-place
    // update of residual_out's tangent cannot change the input's (as in fused_add_rmsnorm).
    T t_h;
    if (t_input.defined() && t_res.defined()) {
      t_h = t_input + t_res;
    } else if (t_input.defined() || t_res.defined()) {
      t_h = (t_input.defined() ? t_input : t_res).clone();
    }
    if (t_h.defined()) residual_out._set_fw_grad(t_h, /*level=*/0, /*is_inplace_op=*/false);
    const T t_out = layer_norm_tangent(residual_out, w, eps, t_h, t_w, t_b);
    if (t_out.defined()) {
      set_tangent("fused_add_layer_norm", out, t_out, {t_h, t_w, t_b, residual_out, w});
    }
  }
  // Saved after its tangent is set (see fused_add_rmsnorm): a backward run while the tangents
  // live must see it and refuse rather than silently miss the gradient's own tangent.
  if (node) node->residual_out_ = SavedVariable(residual_out, true);
  return {out, residual_out};
}

Triple layer_norm_backward_autograd(const T& grad_out, const T& input, const OptT& weight,
                                    const OptT& bias, double eps) {
  return call_backward_op("layer_norm_backward", "layer_norm", layer_norm_backward_op(),
                          {grad_out, input, weight.value_or(T()), bias.value_or(T())}, grad_out,
                          input, weight, bias, eps);
}

Triple fused_add_layer_norm_backward_autograd(const T& grad_out, const OptT& grad_residual_out,
                                              const T& residual_out, const OptT& weight,
                                              const OptT& bias, double eps) {
  return call_backward_op("fused_add_layer_norm_backward", "fused_add_layer_norm",
                          fused_add_backward_op(),
                          {grad_out, grad_residual_out.value_or(T()), residual_out,
                           weight.value_or(T()), bias.value_or(T())},
                          grad_out, grad_residual_out, residual_out, weight, bias, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, Autograd, m) {
  m.impl("layer_norm", &layer_norm_autograd);
  m.impl("fused_add_layer_norm", &fused_add_layer_norm_autograd);
  m.impl("layer_norm_backward", &layer_norm_backward_autograd);
  m.impl("fused_add_layer_norm_backward", &fused_add_layer_norm_backward_autograd);
}

}  // namespace metalcore
