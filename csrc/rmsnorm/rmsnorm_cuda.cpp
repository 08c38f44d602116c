// CUDA entry points of the RMSNorm family: the same validation and layout as the CPU ones, then
// the launchers of rmsnorm_cuda.cu. Kept out of the .cu file so that all host code, error
// messages included, is built by the host compiler.
#include "rmsnorm/rmsnorm_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "rmsnorm/rmsnorm.h"

namespace metalcore {
namespace {

using cuda::launch_backward;
using cuda::launch_forward;

void check_cuda(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "metalcore.", op, ": expected CUDA tensors, got 'input' on ",
              t.device());
}

// ---------------------------------------------------------------------------------------------
// Entry points (same validation and layout as the CPU ones).

at::Tensor rmsnorm_cuda(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                        double eps) {
  const int64_t n = rmsnorm::check_inputs("rmsnorm", input, weight, eps);
  check_cuda("rmsnorm", input);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty(input.sizes(), input.options());
  if (input.numel() == 0) return out;
  launch_forward(rmsnorm::as_rows(input, n), at::Tensor(), rmsnorm::weight_or_undefined(weight),
                 eps, out.view({-1, n}), at::Tensor());
  return out;
}

std::tuple<at::Tensor, at::Tensor> rmsnorm_backward_cuda(const at::Tensor& grad_out,
                                                         const at::Tensor& input,
                                                         const std::optional<at::Tensor>& weight,
                                                         double eps) {
  const char* op = "rmsnorm_backward";
  const int64_t n = rmsnorm::check_inputs(op, input, weight, eps);
  check_same_device(op, "grad_out", grad_out, "input", input);
  check_same_dtype(op, "grad_out", grad_out, "input", input);
  check_same_shape(op, "grad_out", grad_out, "input", input);
  check_cuda(op, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor w = rmsnorm::weight_or_undefined(weight);
  at::Tensor grad_input = at::empty(input.sizes(), input.options());
  at::Tensor grad_weight =
      w.defined() ? at::empty({n}, input.options()) : at::empty({0}, input.options());
  if (input.numel() == 0) {
    grad_weight.zero_();
    return {grad_input, grad_weight};
  }
  launch_backward(rmsnorm::as_rows(grad_out, n), rmsnorm::as_rows(input, n), w, at::Tensor(), eps,
                  grad_input.view({-1, n}), grad_weight);
  return {grad_input, grad_weight};
}

std::tuple<at::Tensor, at::Tensor> fused_add_rmsnorm_cuda(const at::Tensor& input,
                                                          const at::Tensor& residual,
                                                          const std::optional<at::Tensor>& weight,
                                                          double eps) {
  const char* op = "fused_add_rmsnorm";
  const int64_t n = rmsnorm::check_inputs(op, input, weight, eps);
  check_float(op, "residual", residual);
  check_same_device(op, "residual", residual, "input", input);
  check_same_dtype(op, "residual", residual, "input", input);
  check_same_shape(op, "residual", residual, "input", input);
  check_cuda(op, input);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty(input.sizes(), input.options());
  at::Tensor residual_out = at::empty(input.sizes(), input.options());
  if (input.numel() == 0) return {out, residual_out};
  launch_forward(rmsnorm::as_rows(input, n), rmsnorm::as_rows(residual, n),
                 rmsnorm::weight_or_undefined(weight), eps, out.view({-1, n}),
                 residual_out.view({-1, n}));
  return {out, residual_out};
}

std::tuple<at::Tensor, at::Tensor> fused_add_rmsnorm_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& residual_out, const std::optional<at::Tensor>& weight, double eps) {
  const char* op = "fused_add_rmsnorm_backward";
  const int64_t n = rmsnorm::check_inputs(op, residual_out, weight, eps);
  check_same_device(op, "grad_out", grad_out, "residual_out", residual_out);
  check_same_dtype(op, "grad_out", grad_out, "residual_out", residual_out);
  check_same_shape(op, "grad_out", grad_out, "residual_out", residual_out);
  at::Tensor grad_res;
  if (grad_residual_out.has_value() && grad_residual_out->defined()) {
    check_same_device(op, "grad_residual_out", *grad_residual_out, "residual_out", residual_out);
    check_same_dtype(op, "grad_residual_out", *grad_residual_out, "residual_out", residual_out);
    check_same_shape(op, "grad_residual_out", *grad_residual_out, "residual_out", residual_out);
    grad_res = *grad_residual_out;
  }
  check_cuda(op, residual_out);
  const c10::cuda::CUDAGuard guard(residual_out.device());
  const at::Tensor w = rmsnorm::weight_or_undefined(weight);
  at::Tensor grad_input = at::empty(residual_out.sizes(), residual_out.options());
  at::Tensor grad_weight =
      w.defined() ? at::empty({n}, residual_out.options()) : at::empty({0}, residual_out.options());
  if (residual_out.numel() == 0) {
    grad_weight.zero_();
    return {grad_input, grad_weight};
  }
  launch_backward(rmsnorm::as_rows(grad_out, n), rmsnorm::as_rows(residual_out, n), w,
                  grad_res.defined() ? rmsnorm::as_rows(grad_res, n) : at::Tensor(), eps,
                  grad_input.view({-1, n}), grad_weight);
  return {grad_input, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CUDA, m) {
  m.impl("rmsnorm", &rmsnorm_cuda);
  m.impl("rmsnorm_backward", &rmsnorm_backward_cuda);
  m.impl("fused_add_rmsnorm", &fused_add_rmsnorm_cuda);
  m.impl("fused_add_rmsnorm_backward", &fused_add_rmsnorm_backward_cuda);
}

}  // namespace metalcore
