// Autograd of the activation family: backward calls metalcore::{silu,gelu,swiglu}_backward, and
// forward-mode tangents come from the same ops (each activation's Jacobian is diagonal, so
// J t = *_backward(t, x)).
#include <torch/library.h>

#include "common/autograd_util.h"

namespace metalcore {
namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;
using T = at::Tensor;
using Mode = c10::string_view;

const auto& silu_op() {
  static const auto op = op_handle<T(const T&)>("silu");
  return op;
}
const auto& silu_backward_op() {
  static const auto op = op_handle<T(const T&, const T&)>("silu_backward");
  return op;
}
const auto& gelu_op() {
  static const auto op = op_handle<T(const T&, Mode)>("gelu");
  return op;
}
const auto& gelu_backward_op() {
  static const auto op = op_handle<T(const T&, const T&, Mode)>("gelu_backward");
  return op;
}
const auto& swiglu_op() {
  static const auto op = op_handle<T(const T&, const T&)>("swiglu");
  return op;
}
const auto& swiglu_backward_op() {
  static const auto op = op_handle<Pair(const T&, const T&, const T&)>("swiglu_backward");
  return op;
}

struct SiluBackward : OpNode<SiluBackward> {
  static constexpr const char* kName = "MetalcoreSiluBackward";
  SavedVariable input_;
  template <typename V>
  void visit(V&& v) {
    v(input_, false);
  }
  variable_list backward(variable_list& grads) {
    if (!grads[0].defined()) return {T()};
    return {silu_backward_op().call(grads[0], input_.unpack())};
  }
};

struct GeluBackward : OpNode<GeluBackward> {
  static constexpr const char* kName = "MetalcoreGeluBackward";
  SavedVariable input_;
  std::string approximate_;
  template <typename V>
  void visit(V&& v) {
    v(input_, false);
    v(approximate_);
  }
  variable_list backward(variable_list& grads) {
    if (!grads[0].defined()) return {T()};
    return {gelu_backward_op().call(grads[0], input_.unpack(), approximate_)};
  }
};

struct SwigluBackward : OpNode<SwigluBackward> {
  static constexpr const char* kName = "MetalcoreSwigluBackward";
  SavedVariable gate_, up_;
  template <typename V>
  void visit(V&& v) {
    v(gate_, false);
    v(up_, false);
  }
  variable_list backward(variable_list& grads) {
    if (!grads[0].defined()) return {T(), T()};
    auto [grad_gate, grad_up] = swiglu_backward_op().call(grads[0], gate_.unpack(), up_.unpack());
    return {grad_gate, grad_up};
  }
};

T silu_autograd(const T& input) {
  const bool grad = any_requires_grad({input});
  const T t_input = tangent_of(input);
  if (!grad && !t_input.defined()) return call_below(silu_op(), input);
  T out = call_below(silu_op(), input);
  if (grad) {
    auto node = new_node<SiluBackward>(input);
    node->input_ = SavedVariable(input, false);
    torch::autograd::set_history(out, node);
  }
  if (t_input.defined()) {
    set_tangent("silu", out, call_below(silu_backward_op(), t_input, input), {t_input, input});
  }
  return out;
}

T gelu_autograd(const T& input, Mode approximate) {
  const bool grad = any_requires_grad({input});
  const T t_input = tangent_of(input);
  if (!grad && !t_input.defined()) return call_below(gelu_op(), input, approximate);
  T out = call_below(gelu_op(), input, approximate);
  if (grad) {
    auto node = new_node<GeluBackward>(input);
    node->input_ = SavedVariable(input, false);
    node->approximate_ = std::string(approximate);
    torch::autograd::set_history(out, node);
  }
  if (t_input.defined()) {
    set_tangent("gelu", out, call_below(gelu_backward_op(), t_input, input, approximate),
                {t_input, input});
  }
  return out;
}

T swiglu_autograd(const T& gate, const T& up) {
  const bool grad = any_requires_grad({gate, up});
  const T t_gate = tangent_of(gate), t_up = tangent_of(up);
  if (!grad && !t_gate.defined() && !t_up.defined()) return call_below(swiglu_op(), gate, up);
  T out = call_below(swiglu_op(), gate, up);
  if (grad) {
    auto node = new_node<SwigluBackward>(gate, up);
    node->gate_ = SavedVariable(gate, false);
    node->up_ = SavedVariable(up, false);
    torch::autograd::set_history(out, node);
  }
  if (t_gate.defined() || t_up.defined()) {
    // J_gate t = t * silu'(gate) * up and J_up t = t * silu(gate): the two outputs of
    // swiglu_backward with t as grad_out.
    T tangent;
    if (t_gate.defined()) tangent = std::get<0>(call_below(swiglu_backward_op(), t_gate, gate, up));
    if (t_up.defined()) {
      T part = std::get<1>(call_below(swiglu_backward_op(), t_up, gate, up));
      tangent = tangent.defined() ? add_below(tangent, part) : part;
    }
    set_tangent("swiglu", out, tangent, {t_gate, t_up, gate, up});
  }
  return out;
}

T silu_backward_autograd(const T& grad_out, const T& input) {
  return call_backward_op("silu_backward", "silu", silu_backward_op(), {grad_out, input}, grad_out,
                          input);
}

T gelu_backward_autograd(const T& grad_out, const T& input, Mode approximate) {
  return call_backward_op("gelu_backward", "gelu", gelu_backward_op(), {grad_out, input}, grad_out,
                          input, approximate);
}

Pair swiglu_backward_autograd(const T& grad_out, const T& gate, const T& up) {
  return call_backward_op("swiglu_backward", "swiglu", swiglu_backward_op(), {grad_out, gate, up},
                          grad_out, gate, up);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, Autograd, m) {
  m.impl("silu", &silu_autograd);
  m.impl("gelu", &gelu_autograd);
  m.impl("swiglu", &swiglu_autograd);
  m.impl("silu_backward", &silu_backward_autograd);
  m.impl("gelu_backward", &gelu_backward_autograd);
  m.impl("swiglu_backward", &swiglu_backward_autograd);
}

}  // namespace metalcore
