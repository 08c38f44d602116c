// Activation family: validation and the entry points shared by the CPU and CUDA backends (the
// Metal launch layer, activation_launch.cpp, adds Metal's own limits). Inputs of any layout are
// read through a contiguous view (a copy only when not already contiguous); outputs are
// contiguous; empty tensors launch nothing.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string_view>
#include <tuple>

#include "common/backend.h"
#include "common/checks.h"

namespace metalcore::activation {

// Returns true for 'tanh', false for 'none' (torch.nn.functional.gelu's two modes).
inline bool parse_approximate(const char* op, std::string_view approximate) {
  TORCH_CHECK_VALUE(approximate == "none" || approximate == "tanh", "metalcore.", op,
                    ": 'approximate' must be 'none' or 'tanh', got '", approximate, "'");
  return approximate == "tanh";
}

// grad_out and every extra operand must match `input` in device, dtype and shape.
inline void check_like(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                       const at::Tensor& ref) {
  check_float(op, arg, t);
  check_same_device(op, arg, t, ref_arg, ref);
  check_same_dtype(op, arg, t, ref_arg, ref);
  check_same_shape(op, arg, t, ref_arg, ref);
}

// ---------------------------------------------------------------------------------------------
// Entry points, written once for every backend b (activation_cpu.cpp, activation_cuda.cpp, and
// the Metal launch layer activation_launch.cpp): B::Guard, b.check(op, arg, x) for the backend's
// own limits, and kernels on contiguous operands of one shape and dtype:
//   silu(x, out)  silu_backward(grad_out, x, grad_in)
//   gelu(x, tanh, out)  gelu_backward(grad_out, x, tanh, grad_in)
//   swiglu(gate, up, out)  swiglu_backward(grad_out, gate, up, grad_gate, grad_up)

inline at::Tensor new_like(const at::Tensor& t) { return at::empty(t.sizes(), t.options()); }

template <typename B>
at::Tensor silu(const B& b, const at::Tensor& input) {
  check_float("silu", "input", input);
  b.check("silu", "input", input);
  const typename B::Guard guard(input.device());
  at::Tensor out = new_like(input);
  if (input.numel() > 0) b.silu(input.contiguous(), out);
  return out;
}

template <typename B>
at::Tensor silu_backward(const B& b, const at::Tensor& grad_out, const at::Tensor& input) {
  check_float("silu_backward", "input", input);
  check_like("silu_backward", "grad_out", grad_out, "input", input);
  b.check("silu_backward", "input", input);
  const typename B::Guard guard(input.device());
  at::Tensor grad_input = new_like(input);
  if (input.numel() > 0) b.silu_backward(grad_out.contiguous(), input.contiguous(), grad_input);
  return grad_input;
}

template <typename B>
at::Tensor gelu(const B& b, const at::Tensor& input, c10::string_view approximate) {
  check_float("gelu", "input", input);
  const bool tanh_approx = parse_approximate("gelu", approximate);
  b.check("gelu", "input", input);
  const typename B::Guard guard(input.device());
  at::Tensor out = new_like(input);
  if (input.numel() > 0) b.gelu(input.contiguous(), tanh_approx, out);
  return out;
}

template <typename B>
at::Tensor gelu_backward(const B& b, const at::Tensor& grad_out, const at::Tensor& input,
                         c10::string_view approximate) {
  check_float("gelu_backward", "input", input);
  check_like("gelu_backward", "grad_out", grad_out, "input", input);
  const bool tanh_approx = parse_approximate("gelu_backward", approximate);
  b.check("gelu_backward", "input", input);
  const typename B::Guard guard(input.device());
  at::Tensor grad_input = new_like(input);
  if (input.numel() > 0) {
    b.gelu_backward(grad_out.contiguous(), input.contiguous(), tanh_approx, grad_input);
  }
  return grad_input;
}

template <typename B>
at::Tensor swiglu(const B& b, const at::Tensor& gate, const at::Tensor& up) {
  check_float("swiglu", "gate", gate);
  check_like("swiglu", "up", up, "gate", gate);
  b.check("swiglu", "gate", gate);
  const typename B::Guard guard(gate.device());
  at::Tensor out = new_like(gate);
  if (gate.numel() > 0) b.swiglu(gate.contiguous(), up.contiguous(), out);
  return out;
}

template <typename B>
std::tuple<at::Tensor, at::Tensor> swiglu_backward(const B& b, const at::Tensor& grad_out,
                                                   const at::Tensor& gate, const at::Tensor& up) {
  check_float("swiglu_backward", "gate", gate);
  check_like("swiglu_backward", "up", up, "gate", gate);
  check_like("swiglu_backward", "grad_out", grad_out, "gate", gate);
  b.check("swiglu_backward", "gate", gate);
  const typename B::Guard guard(gate.device());
  at::Tensor grad_gate = new_like(gate), grad_up = new_like(up);
  if (gate.numel() > 0) {
    b.swiglu_backward(grad_out.contiguous(), gate.contiguous(), up.contiguous(), grad_gate,
                      grad_up);
  }
  return {grad_gate, grad_up};
}

// Registers the family's six ops for a stateless backend B (CPU, CUDA).
template <typename B>
void register_impls(torch::Library& m) {
  using T = at::Tensor;
  using Mode = c10::string_view;
  m.impl("silu", [](const T& x) { return silu(B{}, x); });
  m.impl("silu_backward", [](const T& g, const T& x) { return silu_backward(B{}, g, x); });
  m.impl("gelu", [](const T& x, Mode a) { return gelu(B{}, x, a); });
  m.impl("gelu_backward",
         [](const T& g, const T& x, Mode a) { return gelu_backward(B{}, g, x, a); });
  m.impl("swiglu", [](const T& gate, const T& up) { return swiglu(B{}, gate, up); });
  m.impl("swiglu_backward",
         [](const T& g, const T& gate, const T& up) { return swiglu_backward(B{}, g, gate, up); });
}

}  // namespace metalcore::activation
