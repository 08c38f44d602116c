// LoRA linear family: validation and the entry points, written once for every backend. The math
// is a composition of at::mm/addmm (BLAS on the CPU, cuBLAS on CUDA, MPS matmul on Metal): the
// matrix products are what BLAS does best, and what the op adds is keeping the forward and backward
// each one node in graphs while never forming the [out, in] matrix scaling * B @ A (r * out * in
// flops and a weight-sized buffer per step): the low-rank path goes through the [M, r] activations.
//
//   forward:  h = scaling * x @ A^T [M, r];  y = bias + x @ W^T + h @ B^T  (two addmm into y)
//   backward: u = scaling * g @ B [M, r];  dx = g @ W + u @ A;  dA = u^T @ x;
//             dB = g^T @ (scaling * h) (h recomputed: M * in * r flops, less than saving it costs
//             in memory across the step);  dbias = sum_rows(g);  dW = g^T @ x only when asked.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "common/backend.h"
#include "common/checks.h"

namespace metalcore::lora {

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A 2-D argument of exact shape [rows, cols], the input's device and dtype.
inline void check_matrix(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& x,
                         int64_t rows, int64_t cols, const char* what) {
  check_float(op, arg, t);
  check_same_device(op, arg, t, "input", x);
  check_same_dtype(op, arg, t, "input", x);
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "metalcore.", op, ": '",
                    arg, "' must have shape [", rows, ", ", cols, "] (", what, "), got ",
                    t.sizes());
}

struct Dims {
  int64_t in, out, rank;
};

// input [..., in], weight [out, in], lora_a [r, in], lora_b [out, r], bias [out] or None.
inline Dims check_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& lora_a, const at::Tensor& lora_b,
                         const std::optional<at::Tensor>& bias, double scaling) {
  check_float(op, "input", x);
  check_dim_at_least(op, "input", x, 1);
  const int64_t in = x.size(-1);
  check_float(op, "weight", weight);
  check_same_device(op, "weight", weight, "input", x);
  check_same_dtype(op, "weight", weight, "input", x);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == in, "metalcore.", op,
                    ": 'weight' must have shape [out_features, ", in,
                    "] (the last dim of 'input'), got ", weight.sizes());
  const int64_t out = weight.size(0);
  check_float(op, "lora_a", lora_a);
  check_same_device(op, "lora_a", lora_a, "input", x);
  check_same_dtype(op, "lora_a", lora_a, "input", x);
  TORCH_CHECK_VALUE(lora_a.dim() == 2 && lora_a.size(1) == in, "metalcore.", op,
                    ": 'lora_a' must have shape [r, ", in, "] (PEFT's layout), got ",
                    lora_a.sizes());
  const int64_t rank = lora_a.size(0);
  check_matrix(op, "lora_b", lora_b, x, out, rank, "[out_features, r], PEFT's layout");
  if (present(bias)) {
    check_float(op, "bias", *bias);
    check_same_device(op, "bias", *bias, "input", x);
    check_same_dtype(op, "bias", *bias, "input", x);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, "metalcore.", op,
                      ": 'bias' must have shape [", out, "] (out_features), got ", bias->sizes());
  }
  TORCH_CHECK_VALUE(std::isfinite(scaling), "metalcore.", op, ": 'scaling' must be finite, got ",
                    scaling);
  return {in, out, rank};
}

// A contiguous copy at a 64-byte-aligned address (CPU) unless `t` already is one. BLAS (MKL) takes
// another code path, and sums in another order, for a misaligned operand: an input view at an
// odd storage offset gave other bits in eager mode than the aligned copy a compiled graph
// passed.
inline at::Tensor aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (c.is_cpu() && reinterpret_cast<std::uintptr_t>(c.const_data_ptr()) % 64 != 0) {
    c = c.clone();
  }
  return c;
}

// [..., n] -> contiguous [M, n] (M from the leading sizes: reshape cannot infer it when n is 0).
// Contiguous operands make the products independent of the callers' layouts: BLAS sums in
// another order for a transposed operand, and a compiled graph (which may pass other layouts
// than eager) must give the same bits.
inline at::Tensor rows_of(const at::Tensor& t, int64_t n) {
  int64_t m = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) m *= t.size(i);
  return aligned(t.reshape({m, n}));
}

// The dtype the products run in: float32 for 16-bit inputs, so that each output is rounded once.
// A float16 sum of two separately rounded products (x W^T, then + h B^T) overflows to inf where
// the first product alone exceeds 65504 and the second brings the total back into range.
inline at::Tensor in_opmath(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kHalf || s == at::kBFloat16 ? t.to(at::kFloat) : t;
}

// Entry points for a backend b: B::Guard, b.check(op, arg, input) (the backend's own limits).
template <typename B>
at::Tensor forward(const B& b, const at::Tensor& input, const at::Tensor& weight,
                   const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
                   const std::optional<at::Tensor>& bias) {
  const char* op = "lora_linear";
  const Dims dims = check_inputs(op, input, weight, lora_a, lora_b, bias, scaling);
  b.check(op, "input", input);
  const typename B::Guard guard(input.device());
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = dims.out;
  const at::Tensor x = in_opmath(rows_of(input, dims.in));
  const at::Tensor w = in_opmath(aligned(weight)), a = in_opmath(aligned(lora_a)),
                   bm = in_opmath(aligned(lora_b));
  at::Tensor y = at::empty({x.size(0), dims.out}, x.options());
  if (present(bias)) {
    at::addmm_out(y, in_opmath(aligned(*bias)), x, w.t());
  } else {
    at::mm_out(y, x, w.t());
  }
  if (dims.rank > 0) {
    // scaling multiplies the [M, r] activations, not through addmm's alpha: BLAS skips the
    // product when alpha is 0, which would turn 0 * inf (NaN, as torch's formula gives) into 0.
    const at::Tensor h = at::mm(x, a.t()).mul_(scaling);
    y.addmm_(h, bm.t());
  }
  return y.to(input.scalar_type()).view(shape);
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename B>
Grads backward(const B& b, const at::Tensor& grad_out, const at::Tensor& input,
               const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
               double scaling, const std::optional<at::Tensor>& bias, bool weight_grad) {
  const char* op = "lora_linear_backward";
  const Dims dims = check_inputs(op, input, weight, lora_a, lora_b, bias, scaling);
  check_float(op, "grad_out", grad_out);
  check_same_device(op, "grad_out", grad_out, "input", input);
  check_same_dtype(op, "grad_out", grad_out, "input", input);
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = dims.out;
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(shape), "metalcore.", op,
                    ": 'grad_out' must have shape ", at::IntArrayRef(shape),
                    " (the output's), got ", grad_out.sizes());
  b.check(op, "input", input);
  const typename B::Guard guard(input.device());
  const at::Tensor x = in_opmath(rows_of(input, dims.in));
  const at::Tensor g = in_opmath(rows_of(grad_out, dims.out));
  const at::Tensor w = in_opmath(aligned(weight)), a = in_opmath(aligned(lora_a)),
                   bm = in_opmath(aligned(lora_b));
  const auto dtype = input.scalar_type();
  // at::mm of an empty inner dim gives zeros, so M == 0 and r == 0 need no special case.
  at::Tensor grad_rows = at::mm(g, w);  // [M, in]
  at::Tensor grad_a, grad_b;
  if (dims.rank > 0) {
    // The [M, r] gradient of the activations, scaled there (see the forward on alpha).
    const at::Tensor u = at::mm(g, bm).mul_(scaling);
    grad_rows.addmm_(u, a);
    grad_a = at::mm(u.t(), x);
    grad_b = at::mm(g.t(), at::mm(x, a.t()).mul_(scaling));  // the forward's scaled h
  } else {
    grad_a = at::zeros_like(lora_a, at::MemoryFormat::Contiguous);
    grad_b = at::zeros_like(lora_b, at::MemoryFormat::Contiguous);
  }
  at::Tensor grad_weight =
      weight_grad ? at::mm(g.t(), x).to(dtype) : at::empty({0}, weight.options());
  at::Tensor grad_bias = present(bias) ? g.sum(0).to(dtype) : at::empty({0}, input.options());
  return {grad_rows.to(dtype).view(input.sizes()), grad_weight, grad_a.to(dtype), grad_b.to(dtype),
          grad_bias};
}

template <typename B>
void register_impls(torch::Library& m) {
  using T = at::Tensor;
  using OptT = std::optional<at::Tensor>;
  m.impl("lora_linear", [](const T& x, const T& w, const T& a, const T& bm, double s,
                           const OptT& bias) { return forward(B{}, x, w, a, bm, s, bias); });
  m.impl("lora_linear_backward",
         [](const T& g, const T& x, const T& w, const T& a, const T& bm, double s, const OptT& bias,
            bool weight_grad) { return backward(B{}, g, x, w, a, bm, s, bias, weight_grad); });
}

}  // namespace metalcore::lora
