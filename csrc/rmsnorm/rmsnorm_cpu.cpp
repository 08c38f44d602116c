// CPU entry points of the RMSNorm family: validate, lay out as rows, allocate, run the kernel.
#include <torch/library.h>

#include "rmsnorm/rmsnorm.h"
#include "rmsnorm/rmsnorm_cpu_kernel.h"

namespace metalcore {
namespace {

at::Tensor rmsnorm_cpu(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                       double eps) {
  const int64_t n = rmsnorm::check_inputs("rmsnorm", input, weight, eps);
  at::Tensor out = at::empty(input.sizes(), input.options());
  if (input.numel() == 0) return out;
  METALCORE_CPU_DISPATCH(rmsnorm_forward, rmsnorm::as_rows(input, n), at::Tensor(),
                         rmsnorm::weight_or_undefined(weight), eps, out.view({-1, n}),
                         at::Tensor());
  return out;
}

std::tuple<at::Tensor, at::Tensor> rmsnorm_backward_cpu(const at::Tensor& grad_out,
                                                        const at::Tensor& input,
                                                        const std::optional<at::Tensor>& weight,
                                                        double eps) {
  const int64_t n = rmsnorm::check_inputs("rmsnorm_backward", input, weight, eps);
  check_same_device("rmsnorm_backward", "grad_out", grad_out, "input", input);
  check_same_dtype("rmsnorm_backward", "grad_out", grad_out, "input", input);
  check_same_shape("rmsnorm_backward", "grad_out", grad_out, "input", input);
  const at::Tensor w = rmsnorm::weight_or_undefined(weight);
  at::Tensor grad_input = at::empty(input.sizes(), input.options());
  at::Tensor grad_weight =
      w.defined() ? at::empty({n}, input.options()) : at::empty({0}, input.options());
  if (input.numel() == 0) {
    grad_weight.zero_();
    return {grad_input, grad_weight};
  }
  METALCORE_CPU_DISPATCH(rmsnorm_backward, rmsnorm::as_rows(grad_out, n),
                         rmsnorm::as_rows(input, n), w, at::Tensor(), eps, grad_input.view({-1, n}),
                         grad_weight);
  return {grad_input, grad_weight};
}

std::tuple<at::Tensor, at::Tensor> fused_add_rmsnorm_cpu(const at::Tensor& input,
                                                         const at::Tensor& residual,
                                                         const std::optional<at::Tensor>& weight,
                                                         double eps) {
  const int64_t n = rmsnorm::check_inputs("fused_add_rmsnorm", input, weight, eps);
  check_float("fused_add_rmsnorm", "residual", residual);
  check_same_device("fused_add_rmsnorm", "residual", residual, "input", input);
  check_same_dtype("fused_add_rmsnorm", "residual", residual, "input", input);
  check_same_shape("fused_add_rmsnorm", "residual", residual, "input", input);
  at::Tensor out = at::empty(input.sizes(), input.options());
  at::Tensor residual_out = at::empty(input.sizes(), input.options());
  if (input.numel() == 0) return {out, residual_out};
  METALCORE_CPU_DISPATCH(rmsnorm_forward, rmsnorm::as_rows(input, n), rmsnorm::as_rows(residual, n),
                         rmsnorm::weight_or_undefined(weight), eps, out.view({-1, n}),
                         residual_out.view({-1, n}));
  return {out, residual_out};
}

std::tuple<at::Tensor, at::Tensor> fused_add_rmsnorm_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& residual_out, const std::optional<at::Tensor>& weight, double eps) {
  const char* op = "fused_add_rmsnorm_backward";
  const int64_t n = rmsnorm::check_inputs(op, residual_out, weight, eps, "residual_out");
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
  const at::Tensor w = rmsnorm::weight_or_undefined(weight);
  at::Tensor grad_input = at::empty(residual_out.sizes(), residual_out.options());
  at::Tensor grad_weight =
      w.defined() ? at::empty({n}, residual_out.options()) : at::empty({0}, residual_out.options());
  if (residual_out.numel() == 0) {
    grad_weight.zero_();
    return {grad_input, grad_weight};
  }
  METALCORE_CPU_DISPATCH(rmsnorm_backward, rmsnorm::as_rows(grad_out, n),
                         rmsnorm::as_rows(residual_out, n), w,
                         grad_res.defined() ? rmsnorm::as_rows(grad_res, n) : at::Tensor(), eps,
                         grad_input.view({-1, n}), grad_weight);
  return {grad_input, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CPU, m) {
  m.impl("rmsnorm", &rmsnorm_cpu);
  m.impl("rmsnorm_backward", &rmsnorm_backward_cpu);
  m.impl("fused_add_rmsnorm", &fused_add_rmsnorm_cpu);
  m.impl("fused_add_rmsnorm_backward", &fused_add_rmsnorm_backward_cpu);
}

}  // namespace metalcore
