// CUDA entry points of the activation family: validation as on the CPU, then the launchers of
// activation_cuda.cu. Empty tensors launch nothing; inputs of any layout are read contiguous.
#include "activation/activation_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "activation/activation.h"

namespace metalcore {
namespace {

using activation::check_like;

void check_cuda(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "metalcore.", op, ": expected CUDA tensors, got '", arg, "' on ",
              t.device());
}

at::Tensor new_like(const at::Tensor& t) { return at::empty(t.sizes(), t.options()); }

at::Tensor silu_cuda(const at::Tensor& input) {
  check_float("silu", "input", input);
  check_cuda("silu", "input", input);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = new_like(input);
  cuda::launch_silu(input.contiguous(), out);
  return out;
}

at::Tensor silu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& input) {
  check_float("silu_backward", "input", input);
  check_like("silu_backward", "grad_out", grad_out, "input", input);
  check_cuda("silu_backward", "input", input);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor grad_input = new_like(input);
  cuda::launch_silu_backward(grad_out.contiguous(), input.contiguous(), grad_input);
  return grad_input;
}

at::Tensor gelu_cuda(const at::Tensor& input, c10::string_view approximate) {
  check_float("gelu", "input", input);
  const bool tanh_approx = activation::parse_approximate("gelu", approximate);
  check_cuda("gelu", "input", input);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = new_like(input);
  cuda::launch_gelu(input.contiguous(), tanh_approx, out);
  return out;
}

at::Tensor gelu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                              c10::string_view approximate) {
  check_float("gelu_backward", "input", input);
  check_like("gelu_backward", "grad_out", grad_out, "input", input);
  const bool tanh_approx = activation::parse_approximate("gelu_backward", approximate);
  check_cuda("gelu_backward", "input", input);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor grad_input = new_like(input);
  cuda::launch_gelu_backward(grad_out.contiguous(), input.contiguous(), tanh_approx, grad_input);
  return grad_input;
}

at::Tensor swiglu_cuda(const at::Tensor& gate, const at::Tensor& up) {
  check_float("swiglu", "gate", gate);
  check_like("swiglu", "up", up, "gate", gate);
  check_cuda("swiglu", "gate", gate);
  const c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor out = new_like(gate);
  cuda::launch_swiglu(gate.contiguous(), up.contiguous(), out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cuda(const at::Tensor& grad_out,
                                                        const at::Tensor& gate,
                                                        const at::Tensor& up) {
  check_float("swiglu_backward", "gate", gate);
  check_like("swiglu_backward", "up", up, "gate", gate);
  check_like("swiglu_backward", "grad_out", grad_out, "gate", gate);
  check_cuda("swiglu_backward", "gate", gate);
  const c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor grad_gate = new_like(gate), grad_up = new_like(up);
  cuda::launch_swiglu_backward(grad_out.contiguous(), gate.contiguous(), up.contiguous(), grad_gate,
                               grad_up);
  return {grad_gate, grad_up};
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CUDA, m) {
  m.impl("silu", &silu_cuda);
  m.impl("silu_backward", &silu_backward_cuda);
  m.impl("gelu", &gelu_cuda);
  m.impl("gelu_backward", &gelu_backward_cuda);
  m.impl("swiglu", &swiglu_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
}

}  // namespace metalcore
