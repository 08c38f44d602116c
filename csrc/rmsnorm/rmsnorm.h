// RMSNorm family: input validation, layout and the entry points shared by the CPU and CUDA
// backends (the Metal launch layer, rmsnorm_launch.cpp, adds Metal's own limits).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/backend.h"
#include "common/checks.h"

namespace metalcore::rmsnorm {

// Validates input/weight/eps for `op` and returns the size of the normalised (last) dim.
// `input_name` is the schema's name of the normalised tensor, so messages name a real argument.
inline int64_t check_inputs(const char* op, const at::Tensor& input,
                            const std::optional<at::Tensor>& weight, double eps,
                            const char* input_name = "input") {
  check_float(op, input_name, input);
  check_dim_at_least(op, input_name, input, 1);
  check_eps(op, eps);
  const int64_t n = input.size(-1);
  if (weight.has_value() && weight->defined()) {
    check_same_device(op, "weight", *weight, input_name, input);
    check_same_dtype(op, "weight", *weight, input_name, input);
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == n, "metalcore.", op,
                      ": 'weight' must have shape [", n, "] (the last dim of '", input_name,
                      "'), got ", weight->sizes());
  }
  return n;
}

// [..., N] -> [rows, N] with unit stride on the last dim; a view when the layout allows it.
inline at::Tensor as_rows(const at::Tensor& t, int64_t n) {
  at::Tensor rows = t.reshape({-1, n});
  if (rows.stride(1) != 1 && rows.size(1) > 1) rows = rows.contiguous();
  return rows;
}

inline at::Tensor weight_or_undefined(const std::optional<at::Tensor>& weight) {
  return weight.has_value() && weight->defined() ? weight->contiguous() : at::Tensor();
}

// ---------------------------------------------------------------------------------------------
// Entry points, written once for every backend b (rmsnorm_cpu.cpp, rmsnorm_cuda.cpp, and the Metal
// launch layer rmsnorm_launch.cpp):
//   B::Guard                         device guard type, constructed from the input's device
//   b.check(op, arg, x)              the backend's own limits on the normalised tensor
//   b.forward(x, residual, weight, eps, out, residual_out)
//   b.backward(grad_out, x, weight, grad_residual, eps, grad_input, grad_weight)
// on [rows, n] views with a unit stride on n, contiguous outputs, undefined optional tensors.

template <typename B>
at::Tensor forward(const B& b, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                   double eps) {
  const int64_t n = check_inputs("rmsnorm", input, weight, eps);
  b.check("rmsnorm", "input", input);
  const typename B::Guard guard(input.device());
  at::Tensor out = at::empty(input.sizes(), input.options());
  if (input.numel() == 0) return out;
  b.forward(as_rows(input, n), at::Tensor(), weight_or_undefined(weight), eps, out.view({-1, n}),
            at::Tensor());
  return out;
}

template <typename B>
std::tuple<at::Tensor, at::Tensor> fused_add_forward(const B& b, const at::Tensor& input,
                                                     const at::Tensor& residual,
                                                     const std::optional<at::Tensor>& weight,
                                                     double eps) {
  const char* op = "fused_add_rmsnorm";
  const int64_t n = check_inputs(op, input, weight, eps);
  check_float(op, "residual", residual);
  check_same_device(op, "residual", residual, "input", input);
  check_same_dtype(op, "residual", residual, "input", input);
  check_same_shape(op, "residual", residual, "input", input);
  b.check(op, "input", input);
  const typename B::Guard guard(input.device());
  at::Tensor out = at::empty(input.sizes(), input.options());
  at::Tensor residual_out = at::empty(input.sizes(), input.options());
  if (input.numel() == 0) return {out, residual_out};
  b.forward(as_rows(input, n), as_rows(residual, n), weight_or_undefined(weight), eps,
            out.view({-1, n}), residual_out.view({-1, n}));
  return {out, residual_out};
}

// Both backward ops: x is the normalised tensor (named x_arg in the schema); grad_res is the
// optional gradient flowing into fused_add_rmsnorm's residual_out.
template <typename B>
std::tuple<at::Tensor, at::Tensor> backward(const B& b, const char* op, const char* x_arg,
                                            const at::Tensor& grad_out,
                                            const std::optional<at::Tensor>& grad_res,
                                            const at::Tensor& x,
                                            const std::optional<at::Tensor>& weight, double eps) {
  const int64_t n = check_inputs(op, x, weight, eps, x_arg);
  check_same_device(op, "grad_out", grad_out, x_arg, x);
  check_same_dtype(op, "grad_out", grad_out, x_arg, x);
  check_same_shape(op, "grad_out", grad_out, x_arg, x);
  const bool has_res = grad_res.has_value() && grad_res->defined();
  if (has_res) {
    check_same_device(op, "grad_residual_out", *grad_res, x_arg, x);
    check_same_dtype(op, "grad_residual_out", *grad_res, x_arg, x);
    check_same_shape(op, "grad_residual_out", *grad_res, x_arg, x);
  }
  b.check(op, x_arg, x);
  const typename B::Guard guard(x.device());
  const at::Tensor w = weight_or_undefined(weight);
  at::Tensor grad_input = at::empty(x.sizes(), x.options());
  at::Tensor grad_weight = at::empty({w.defined() ? n : 0}, x.options());
  if (x.numel() == 0) {
    grad_weight.zero_();
    return {grad_input, grad_weight};
  }
  b.backward(as_rows(grad_out, n), as_rows(x, n), w, has_res ? as_rows(*grad_res, n) : at::Tensor(),
             eps, grad_input.view({-1, n}), grad_weight);
  return {grad_input, grad_weight};
}

template <typename B>
std::tuple<at::Tensor, at::Tensor> rmsnorm_backward(const B& b, const at::Tensor& grad_out,
                                                    const at::Tensor& input,
                                                    const std::optional<at::Tensor>& weight,
                                                    double eps) {
  return backward(b, "rmsnorm_backward", "input", grad_out, std::nullopt, input, weight, eps);
}

template <typename B>
std::tuple<at::Tensor, at::Tensor> fused_add_backward(
    const B& b, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& residual_out, const std::optional<at::Tensor>& weight, double eps) {
  return backward(b, "fused_add_rmsnorm_backward", "residual_out", grad_out, grad_residual_out,
                  residual_out, weight, eps);
}

// Registers the family's four ops for a stateless backend B (CPU, CUDA).
template <typename B>
void register_impls(torch::Library& m) {
  using T = at::Tensor;
  using OptT = std::optional<at::Tensor>;
  m.impl("rmsnorm", [](const T& x, const OptT& w, double eps) { return forward(B{}, x, w, eps); });
  m.impl("rmsnorm_backward", [](const T& g, const T& x, const OptT& w, double eps) {
    return rmsnorm_backward(B{}, g, x, w, eps);
  });
  m.impl("fused_add_rmsnorm", [](const T& x, const T& r, const OptT& w, double eps) {
    return fused_add_forward(B{}, x, r, w, eps);
  });
  m.impl("fused_add_rmsnorm_backward",
         [](const T& g, const OptT& gr, const T& h, const OptT& w, double eps) {
           return fused_add_backward(B{}, g, gr, h, w, eps);
         });
}

}  // namespace metalcore::rmsnorm
