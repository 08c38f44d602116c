// LayerNorm family: input validation, layout and the entry points shared by the CPU, CUDA and
// Metal backends (each binds only its kernels; see layer_norm_cpu.cpp, layer_norm_cuda.cpp,
// layer_norm_launch.cpp). The ops normalise over the last dim; metalcore.layer_norm flattens a
// multi-dim normalized_shape into it, so one kernel shape serves every normalized_shape.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/backend.h"
#include "common/checks.h"

namespace metalcore::layer_norm {

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// weight or bias: [n], same device and dtype as the normalised tensor.
inline void check_affine(const char* op, const char* arg, const std::optional<at::Tensor>& t,
                         const char* input_name, const at::Tensor& input, int64_t n) {
  if (!present(t)) return;
  check_same_device(op, arg, *t, input_name, input);
  check_same_dtype(op, arg, *t, input_name, input);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == n, "metalcore.", op, ": '", arg,
                    "' must have shape [", n, "] (the last dim of '", input_name, "'), got ",
                    t->sizes());
}

// Validates input/weight/bias/eps for `op` and returns the size of the normalised (last) dim.
// `input_name` is the schema's name of the normalised tensor, so messages name a real argument.
inline int64_t check_inputs(const char* op, const at::Tensor& input,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, double eps,
                            const char* input_name = "input") {
  check_float(op, input_name, input);
  check_dim_at_least(op, input_name, input, 1);
  check_eps(op, eps);
  const int64_t n = input.size(-1);
  check_affine(op, "weight", weight, input_name, input, n);
  check_affine(op, "bias", bias, input_name, input, n);
  return n;
}

// [..., N] -> [rows, N] with unit stride on the last dim; a view when the layout allows it.
inline at::Tensor as_rows(const at::Tensor& t, int64_t n) {
  at::Tensor rows = t.reshape({-1, n});
  if (rows.stride(1) != 1 && rows.size(1) > 1) rows = rows.contiguous();
  return rows;
}

inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return present(t) ? t->contiguous() : at::Tensor();
}

// ---------------------------------------------------------------------------------------------
// Entry points, written once for every backend b:
//   B::Guard                         device guard type, constructed from the input's device
//   b.check(op, arg, x)              the backend's own limits on the normalised tensor
//   b.forward(x, residual, weight, bias, eps, out, residual_out)
//   b.backward(grad_out, x, weight, grad_residual, eps, grad_input, grad_weight, grad_bias)
// on [rows, n] views with a unit stride on n, contiguous outputs, undefined optional tensors
// (grad_weight / grad_bias undefined when the op has no weight / bias: nothing to reduce).

template <typename B>
at::Tensor forward(const B& b, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& bias, double eps) {
  const int64_t n = check_inputs("layer_norm", input, weight, bias, eps);
  b.check("layer_norm", "input", input);
  const typename B::Guard guard(input.device());
  at::Tensor out = at::empty(input.sizes(), input.options());
  if (input.numel() == 0) return out;
  b.forward(as_rows(input, n), at::Tensor(), contiguous_or_undefined(weight),
            contiguous_or_undefined(bias), eps, out.view({-1, n}), at::Tensor());
  return out;
}

template <typename B>
std::tuple<at::Tensor, at::Tensor> fused_add_forward(const B& b, const at::Tensor& input,
                                                     const at::Tensor& residual,
                                                     const std::optional<at::Tensor>& weight,
                                                     const std::optional<at::Tensor>& bias,
                                                     double eps) {
  const char* op = "fused_add_layer_norm";
  const int64_t n = check_inputs(op, input, weight, bias, eps);
  check_float(op, "residual", residual);
  check_same_device(op, "residual", residual, "input", input);
  check_same_dtype(op, "residual", residual, "input", input);
  check_same_shape(op, "residual", residual, "input", input);
  b.check(op, "input", input);
  const typename B::Guard guard(input.device());
  at::Tensor out = at::empty(input.sizes(), input.options());
  at::Tensor residual_out = at::empty(input.sizes(), input.options());
  if (input.numel() == 0) return {out, residual_out};
  b.forward(as_rows(input, n), as_rows(residual, n), contiguous_or_undefined(weight),
            contiguous_or_undefined(bias), eps, out.view({-1, n}), residual_out.view({-1, n}));
  return {out, residual_out};
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Both backward ops: x is the normalised tensor (named x_arg in the schema); grad_res is the
// optional gradient flowing into fused_add_layer_norm's residual_out. bias is only validated:
// it decides whether grad_bias is computed, its values do not enter the gradients.
template <typename B>
Grads backward(const B& b, const char* op, const char* x_arg, const at::Tensor& grad_out,
               const std::optional<at::Tensor>& grad_res, const at::Tensor& x,
               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
               double eps) {
  const int64_t n = check_inputs(op, x, weight, bias, eps, x_arg);
  check_same_device(op, "grad_out", grad_out, x_arg, x);
  check_same_dtype(op, "grad_out", grad_out, x_arg, x);
  check_same_shape(op, "grad_out", grad_out, x_arg, x);
  const bool has_res = present(grad_res);
  if (has_res) {
    check_same_device(op, "grad_residual_out", *grad_res, x_arg, x);
    check_same_dtype(op, "grad_residual_out", *grad_res, x_arg, x);
    check_same_shape(op, "grad_residual_out", *grad_res, x_arg, x);
  }
  b.check(op, x_arg, x);
  const typename B::Guard guard(x.device());
  const at::Tensor w = contiguous_or_undefined(weight);
  at::Tensor grad_input = at::empty(x.sizes(), x.options());
  at::Tensor grad_weight = at::empty({w.defined() ? n : 0}, x.options());
  at::Tensor grad_bias = at::empty({present(bias) ? n : 0}, x.options());
  if (x.numel() == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_input, grad_weight, grad_bias};
  }
  b.backward(as_rows(grad_out, n), as_rows(x, n), w, has_res ? as_rows(*grad_res, n) : at::Tensor(),
             eps, grad_input.view({-1, n}), w.defined() ? grad_weight : at::Tensor(),
             present(bias) ? grad_bias : at::Tensor());
  return {grad_input, grad_weight, grad_bias};
}

template <typename B>
Grads layer_norm_backward(const B& b, const at::Tensor& grad_out, const at::Tensor& input,
                          const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps) {
  return backward(b, "layer_norm_backward", "input", grad_out, std::nullopt, input, weight, bias,
                  eps);
}

template <typename B>
Grads fused_add_backward(const B& b, const at::Tensor& grad_out,
                         const std::optional<at::Tensor>& grad_residual_out,
                         const at::Tensor& residual_out, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, double eps) {
  return backward(b, "fused_add_layer_norm_backward", "residual_out", grad_out, grad_residual_out,
                  residual_out, weight, bias, eps);
}

// Registers the family's four ops for a stateless backend B (CPU, CUDA).
template <typename B>
void register_impls(torch::Library& m) {
  using T = at::Tensor;
  using OptT = std::optional<at::Tensor>;
  m.impl("layer_norm", [](const T& x, const OptT& w, const OptT& bias, double eps) {
    return forward(B{}, x, w, bias, eps);
  });
  m.impl("layer_norm_backward",
         [](const T& g, const T& x, const OptT& w, const OptT& bias, double eps) {
           return layer_norm_backward(B{}, g, x, w, bias, eps);
         });
  m.impl("fused_add_layer_norm",
         [](const T& x, const T& r, const OptT& w, const OptT& bias, double eps) {
           return fused_add_forward(B{}, x, r, w, bias, eps);
         });
  m.impl("fused_add_layer_norm_backward",
         [](const T& g, const OptT& gr, const T& h, const OptT& w, const OptT& bias, double eps) {
           return fused_add_backward(B{}, g, gr, h, w, bias, eps);
         });
}

}  // namespace metalcore::layer_norm
