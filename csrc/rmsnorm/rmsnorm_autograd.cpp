// Autograd of the RMSNorm family: forward redispatches below autograd, backward calls
// metalcore::rmsnorm_backward / metalcore::fused_add_rmsnorm_backward.
//
// Forward-mode tangents come from the same ops. With n(x) = rmsnorm(x, None) and
// y = n(x) * w, the tangent is J_n(x) t_x * w + n(x) * t_w, and J_n = r I - r^3 x x^T / N
// (r = rsqrt(mean(x^2) + eps)) is symmetric, so J_n t_x = rmsnorm_backward(t_x, x, None)[0].
// fused_add_rmsnorm normalises h = x + residual, whose tangent is t_x + t_residual.
#include <torch/library.h>

#include "common/autograd_util.h"

namespace metalcore {
namespace {

using T = at::Tensor;
using OptT = std::optional<at::Tensor>;
using Pair = std::tuple<at::Tensor, at::Tensor>;

const auto& rmsnorm_op() {
  static const auto op = op_handle<T(const T&, const OptT&, double)>("rmsnorm");
  return op;
}
const auto& rmsnorm_backward_op() {
  static const auto op =
      op_handle<Pair(const T&, const T&, const OptT&, double)>("rmsnorm_backward");
  return op;
}
const auto& fused_add_op() {
  static const auto op =
      op_handle<Pair(const T&, const T&, const OptT&, double)>("fused_add_rmsnorm");
  return op;
}
const auto& fused_add_backward_op() {
  static const auto op = op_handle<Pair(const T&, const OptT&, const T&, const OptT&, double)>(
      "fused_add_rmsnorm_backward");
  return op;
}

OptT opt(const T& t) { return t.defined() ? OptT(t) : std::nullopt; }

struct RmsNormBackward : OpNode<RmsNormBackward> {
  static constexpr const char* kName = "MetalcoreRmsNormBackward";
  SavedVariable input_, weight_;
  double eps_ = 0.0;
  template <typename V>
  void visit(V&& v) {
    v(input_, false);
    v(weight_, false);
    v(eps_);
  }
  variable_list backward(variable_list& grads) {
    if (!grads[0].defined()) return {T(), T()};
    const T weight = weight_.unpack();
    auto [grad_input, grad_weight] =
        rmsnorm_backward_op().call(grads[0], input_.unpack(), opt(weight), eps_);
    return {grad_input, weight.defined() ? grad_weight : T()};
  }
};

struct FusedAddRmsNormBackward : OpNode<FusedAddRmsNormBackward> {
  static constexpr const char* kName = "MetalcoreFusedAddRmsNormBackward";
  // The backward needs only the summed residual (an output), not input and residual apart.
  SavedVariable residual_out_, weight_;
  double eps_ = 0.0;
  template <typename V>
  void visit(V&& v) {
    v(residual_out_, true);
    v(weight_, false);
    v(eps_);
  }
  variable_list backward(variable_list& grads) {
    // An unused output's gradient is undefined rather than a materialised zero tensor.
    if (!grads[0].defined() && !grads[1].defined()) return {T(), T(), T()};
    const T residual_out = residual_out_.unpack(self_ptr(this));
    const T weight = weight_.unpack();
    const T grad_out = grads[0].defined() ? grads[0] : at::zeros_like(residual_out);
    auto [grad_x, grad_weight] =
        fused_add_backward_op().call(grad_out, opt(grads[1]), residual_out, opt(weight), eps_);
    // d(input + residual)/d input = d/d residual = identity.
    return {grad_x, grad_x, weight.defined() ? grad_weight : T()};
  }
};

// The tangent of rmsnorm(x, weight) for tangents t_x, t_w (either may be undefined), below
// autograd (see set_tangent).
T rmsnorm_tangent(const T& x, const T& weight, double eps, const T& t_x, const T& t_w) {
  at::AutoDispatchBelowADInplaceOrView guard;
  T tangent;
  if (t_x.defined()) {
    tangent = std::get<0>(rmsnorm_backward_op().call(t_x, x, std::nullopt, eps));
    if (weight.defined()) tangent = tangent * weight;
  }
  if (t_w.defined()) {
    T part = rmsnorm_op().call(x, std::nullopt, eps) * t_w;
    tangent = tangent.defined() ? tangent + part : part;
  }
  return tangent;
}

T rmsnorm_autograd(const T& input, const OptT& weight, double eps) {
  const T w = weight.value_or(T());
  const bool grad = any_requires_grad({input, w});
  const T t_input = tangent_of(input), t_w = tangent_of(w);
  if (!grad && !t_input.defined() && !t_w.defined()) {
    return call_below(rmsnorm_op(), input, weight, eps);
  }
  T out = call_below(rmsnorm_op(), input, weight, eps);
  if (grad) {
    auto node = new_node<RmsNormBackward>(input, w);
    node->input_ = SavedVariable(input, false);
    node->weight_ = SavedVariable(w, false);
    node->eps_ = eps;
    torch::autograd::set_history(out, node);
  }
  if (t_input.defined() || t_w.defined()) {
    set_tangent("rmsnorm", out, rmsnorm_tangent(input, w, eps, t_input, t_w),
                {t_input, t_w, input, w});
  }
  return out;
}

Pair fused_add_rmsnorm_autograd(const T& input, const T& residual, const OptT& weight, double eps) {
  const T w = weight.value_or(T());
  const bool grad = any_requires_grad({input, residual, w});
  const T t_input = tangent_of(input), t_res = tangent_of(residual), t_w = tangent_of(w);
  const bool fw = t_input.defined() || t_res.defined() || t_w.defined();
  if (!grad && !fw) return call_below(fused_add_op(), input, residual, weight, eps);
  auto [out, residual_out] = call_below(fused_add_op(), input, residual, weight, eps);
  decltype(new_node<FusedAddRmsNormBackward>(input, residual, w)) node;
  if (grad) {
    node = new_node<FusedAddRmsNormBackward>(input, residual, w);
    node->weight_ = SavedVariable(w, false);
    node->eps_ = eps;
    torch::autograd::set_history(out, node);
    torch::autograd::set_history(residual_out, node);
  }
  if (fw) {
    // residual_out = input + residual is linear: its tangent is differentiable as it is. A
    // single tangent is copied, so an in-place update of residual_out's tangent (which forward
    // AD applies for in-place ops on residual_out) cannot change the input's.
    T t_h;
    if (t_input.defined() && t_res.defined()) {
      t_h = t_input + t_res;
    } else if (t_input.defined() || t_res.defined()) {
      t_h = (t_input.defined() ? t_input : t_res).clone();
    }
    if (t_h.defined()) residual_out._set_fw_grad(t_h, /*level=*/0, /*is_inplace_op=*/false);
    set_tangent("fused_add_rmsnorm", out, rmsnorm_tangent(residual_out, w, eps, t_h, t_w),
                {t_h, t_w, residual_out, w});
  }
  // Saved after its tangent is set: a saved tensor keeps the tangent it had then, and a backward
  // run while the tangents live must see it (and refuse, having no second derivative) rather
  // than compute a gradient whose own tangent would silently be missing.
  if (node) node->residual_out_ = SavedVariable(residual_out, true);
  return {out, residual_out};
}

Pair rmsnorm_backward_autograd(const T& grad_out, const T& input, const OptT& weight, double eps) {
  return call_backward_op("rmsnorm_backward", "rmsnorm", rmsnorm_backward_op(),
                          {grad_out, input, weight.value_or(T())}, grad_out, input, weight, eps);
}

Pair fused_add_rmsnorm_backward_autograd(const T& grad_out, const OptT& grad_residual_out,
                                         const T& residual_out, const OptT& weight, double eps) {
  return call_backward_op(
      "fused_add_rmsnorm_backward", "fused_add_rmsnorm", fused_add_backward_op(),
      {grad_out, grad_residual_out.value_or(T()), residual_out, weight.value_or(T())}, grad_out,
      grad_residual_out, residual_out, weight, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, Autograd, m) {
  m.impl("rmsnorm", &rmsnorm_autograd);
  m.impl("fused_add_rmsnorm", &fused_add_rmsnorm_autograd);
  m.impl("rmsnorm_backward", &rmsnorm_backward_autograd);
  m.impl("fused_add_rmsnorm_backward", &fused_add_rmsnorm_backward_autograd);
}

}  // namespace metalcore
