// CPU entry points of the activation family. Inputs of any layout are read through a
// contiguous view (a copy only when the input is not already contiguous); outputs are contiguous.
#include <torch/library.h>

#include "activation/activation.h"
#include "activation/activation_cpu_kernel.h"

namespace metalcore {
namespace {

using activation::check_like;

at::Tensor new_like(const at::Tensor& t) { return at::empty(t.sizes(), t.options()); }

at::Tensor silu_cpu(const at::Tensor& input) {
  check_float("silu", "input", input);
  at::Tensor out = new_like(input);
  if (input.numel() > 0) METALCORE_CPU_DISPATCH(silu_forward, input.contiguous(), out);
  return out;
}

at::Tensor silu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& input) {
  check_float("silu_backward", "input", input);
  check_like("silu_backward", "grad_out", grad_out, "input", input);
  at::Tensor grad_input = new_like(input);
  if (input.numel() > 0) {
    METALCORE_CPU_DISPATCH(silu_backward, grad_out.contiguous(), input.contiguous(), grad_input);
  }
  return grad_input;
}

at::Tensor gelu_cpu(const at::Tensor& input, c10::string_view approximate) {
  check_float("gelu", "input", input);
  const bool tanh_approx = activation::parse_approximate("gelu", approximate);
  at::Tensor out = new_like(input);
  if (input.numel() > 0) METALCORE_CPU_DISPATCH(gelu_forward, input.contiguous(), tanh_approx, out);
  return out;
}

at::Tensor gelu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                             c10::string_view approximate) {
  check_float("gelu_backward", "input", input);
  check_like("gelu_backward", "grad_out", grad_out, "input", input);
  const bool tanh_approx = activation::parse_approximate("gelu_backward", approximate);
  at::Tensor grad_input = new_like(input);
  if (input.numel() > 0) {
    METALCORE_CPU_DISPATCH(gelu_backward, grad_out.contiguous(), input.contiguous(), tanh_approx,
                           grad_input);
  }
  return grad_input;
}

at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_float("swiglu", "gate", gate);
  check_like("swiglu", "up", up, "gate", gate);
  at::Tensor out = new_like(gate);
  if (gate.numel() > 0) {
    METALCORE_CPU_DISPATCH(swiglu_forward, gate.contiguous(), up.contiguous(), out);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad_out,
                                                       const at::Tensor& gate,
                                                       const at::Tensor& up) {
  check_float("swiglu_backward", "gate", gate);
  check_like("swiglu_backward", "up", up, "gate", gate);
  check_like("swiglu_backward", "grad_out", grad_out, "gate", gate);
  at::Tensor grad_gate = new_like(gate), grad_up = new_like(up);
  if (gate.numel() > 0) {
    METALCORE_CPU_DISPATCH(swiglu_backward, grad_out.contiguous(), gate.contiguous(),
                           up.contiguous(), grad_gate, grad_up);
  }
  return {grad_gate, grad_up};
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CPU, m) {
  m.impl("silu", &silu_cpu);
  m.impl("silu_backward", &silu_backward_cpu);
  m.impl("gelu", &gelu_cpu);
  m.impl("gelu_backward", &gelu_backward_cpu);
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace metalcore
