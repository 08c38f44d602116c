// Autograd of the attention family: the forward redispatches below autograd and saves q, k, v,
// the mask, out and lse (never an Lq x Lk tensor); the backward calls
// metalcore::attention_backward with the gradients of out and lse (either may be missing).
//
// The mask gets no gradient (an additive mask that requires grad is an error, not a silently
// dropped derivative), and forward-mode AD (jvp) is not implemented: a tangent is an error
// naming the op.
#include <torch/library.h>

#include "common/autograd_util.h"

namespace metalcore {
namespace {

using T = at::Tensor;
using OptT = std::optional<at::Tensor>;
using Pair = std::tuple<at::Tensor, at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using ForwardSig = Pair(const T&, const T&, const T&, const OptT&, std::optional<double>, bool,
                        int64_t, int64_t);
using BackwardSig = Triple(const T&, const OptT&, const T&, const T&, const T&, const T&, const T&,
                           const OptT&, std::optional<double>, bool, int64_t, int64_t);

const auto& forward_op() {
  static const auto op = op_handle<ForwardSig>("attention");
  return op;
}
const auto& backward_op() {
  static const auto op = op_handle<BackwardSig>("attention_backward");
  return op;
}

OptT opt(const T& t) { return t.defined() ? OptT(t) : std::nullopt; }

struct AttentionBackward : OpNode<AttentionBackward> {
  static constexpr const char* kName = "MetalcoreAttentionBackward";
  SavedVariable q_, k_, v_, mask_, out_, lse_;
  std::optional<double> scale_;
  bool is_causal_ = false;
  int64_t window_left_ = -1, window_right_ = -1;
  template <typename V>
  void visit(V&& v) {
    v(q_, false);
    v(k_, false);
    v(v_, false);
    v(mask_, false);
    v(out_, true);
    v(lse_, true);
    v(scale_);
    v(is_causal_);
    v(window_left_);
    v(window_right_);
  }
  variable_list backward(variable_list& grads) {
    if (!grads[0].defined() && !grads[1].defined()) return {T(), T(), T()};
    const auto self = self_ptr(this);
    const T out = out_.unpack(self);
    const T grad_out = grads[0].defined() ? grads[0] : at::zeros_like(out);
    auto [dq, dk, dv] = backward_op().call(grad_out, opt(grads[1]), q_.unpack(), k_.unpack(),
                                           v_.unpack(), out, lse_.unpack(self), opt(mask_.unpack()),
                                           scale_, is_causal_, window_left_, window_right_);
    return {dq, dk, dv};
  }
};

Pair attention_autograd(const T& q, const T& k, const T& v, const OptT& mask,
                        std::optional<double> scale, bool is_causal, int64_t window_left,
                        int64_t window_right) {
  const T m = mask.value_or(T());
  TORCH_CHECK(!any_has_tangent({q, k, v, m}),
              "metalcore.attention: forward-mode AD (jvp) is not "
              "supported; use reverse mode (backward, torch.func.grad/vjp)");
  if (at::GradMode::is_enabled() && m.defined()) {
    TORCH_CHECK(!m.requires_grad(),
                "metalcore.attention: gradients with respect to 'attn_mask' "
                "are not supported; pass it detached");
  }
  if (!any_requires_grad({q, k, v})) {
    return call_below(forward_op(), q, k, v, mask, scale, is_causal, window_left, window_right);
  }
  auto [out, lse] =
      call_below(forward_op(), q, k, v, mask, scale, is_causal, window_left, window_right);
  auto node = new_node<AttentionBackward>(q, k, v);
  node->q_ = SavedVariable(q, false);
  node->k_ = SavedVariable(k, false);
  node->v_ = SavedVariable(v, false);
  node->mask_ = SavedVariable(m, false);
  node->scale_ = scale;
  node->is_causal_ = is_causal;
  node->window_left_ = window_left;
  node->window_right_ = window_right;
  torch::autograd::set_history(out, node);
  torch::autograd::set_history(lse, node);
  node->out_ = SavedVariable(out, true);
  node->lse_ = SavedVariable(lse, true);
  return {out, lse};
}

Triple attention_backward_autograd(const T& grad_out, const OptT& grad_lse, const T& q, const T& k,
                                   const T& v, const T& out, const T& lse, const OptT& mask,
                                   std::optional<double> scale, bool is_causal, int64_t window_left,
                                   int64_t window_right) {
  return call_backward_op("attention_backward", "attention", backward_op(),
                          {grad_out, grad_lse.value_or(T()), q, k, v, out, lse}, grad_out, grad_lse,
                          q, k, v, out, lse, mask, scale, is_causal, window_left, window_right);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, Autograd, m) {
  m.impl("attention", &attention_autograd);
  m.impl("attention_backward", &attention_backward_autograd);
}

}  // namespace metalcore
