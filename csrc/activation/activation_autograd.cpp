// Autograd of the activation family: backward calls metalcore::{silu,gelu,swiglu}_backward.
#include <torch/library.h>

#include "common/autograd_util.h"

namespace metalcore {
namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;

class SiluFunction : public torch::autograd::Function<SiluFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&)>("silu");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({input});
    return op.call(input);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("silu_backward");
    return {op.call(grads[0], ctx->get_saved_variables()[0])};
  }
};

class GeluFunction : public torch::autograd::Function<GeluFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            c10::string_view approximate) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, c10::string_view)>("gelu");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({input});
    ctx->saved_data["approximate"] = std::string(approximate);
    return op.call(input, approximate);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view)>(
            "gelu_backward");
    const std::string approximate = ctx->saved_data["approximate"].toStringRef();
    return {op.call(grads[0], ctx->get_saved_variables()[0], approximate), at::Tensor()};
  }
};

class SwigluFunction : public torch::autograd::Function<SwigluFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("swiglu");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({gate, up});
    return op.call(gate, up);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        op_handle<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("swiglu_backward");
    const auto saved = ctx->get_saved_variables();
    auto [grad_gate, grad_up] = op.call(grads[0], saved[0], saved[1]);
    return {grad_gate, grad_up};
  }
};

at::Tensor silu_autograd(const at::Tensor& input) {
  if (any_requires_grad({input})) return SiluFunction::apply(input);
  static const auto op = op_handle<at::Tensor(const at::Tensor&)>("silu");
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(input);
}

at::Tensor gelu_autograd(const at::Tensor& input, c10::string_view approximate) {
  if (any_requires_grad({input})) return GeluFunction::apply(input, approximate);
  static const auto op = op_handle<at::Tensor(const at::Tensor&, c10::string_view)>("gelu");
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(input, approximate);
}

at::Tensor swiglu_autograd(const at::Tensor& gate, const at::Tensor& up) {
  if (any_requires_grad({gate, up})) return SwigluFunction::apply(gate, up);
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("swiglu");
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(gate, up);
}

at::Tensor silu_backward_autograd(const at::Tensor& grad_out, const at::Tensor& input) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("silu_backward");
  check_no_double_backward("silu_backward", {grad_out, input});
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(grad_out, input);
}

at::Tensor gelu_backward_autograd(const at::Tensor& grad_out, const at::Tensor& input,
                                  c10::string_view approximate) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view)>(
          "gelu_backward");
  check_no_double_backward("gelu_backward", {grad_out, input});
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(grad_out, input, approximate);
}

Pair swiglu_backward_autograd(const at::Tensor& grad_out, const at::Tensor& gate,
                              const at::Tensor& up) {
  static const auto op =
      op_handle<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("swiglu_backward");
  check_no_double_backward("swiglu_backward", {grad_out, gate, up});
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(grad_out, gate, up);
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
