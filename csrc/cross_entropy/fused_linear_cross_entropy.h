// fused_linear_cross_entropy (shared implementation): the LM head (logits = input @ weight^T +
// bias) and the cross-entropy loss, computed in chunks of tokens so the [N, V] logits never exist
// at once. Built from at::mm and the cross_entropy ops per chunk (looked up in the dispatcher by
// namespace: `metalcore`, or the test-only `metalcore_msim` of the Metal path on Linux), and
// registered for every backend those have: CPU and CUDA by
// fused_linear_cross_entropy_autograd.cpp, MPS and msim by the Metal launch layer
// (fused_linear_cross_entropy_launch.cpp).
//
// Gradients: the backward op recomputes each chunk's logits and turns them into that chunk's
// share of grad_input, grad_weight and grad_bias (4 matmuls per chunk in all: 1 forward, 3
// backward). Liger-Kernel's design instead computes the gradients inside the forward and keeps
// them for the backward (3 matmuls, no recomputation); it only works for a scalar loss whose
// gradient is applied by rescaling, runs the gradient matmuls even when no backward follows
// (evaluation under grad mode), and holds grad_input and grad_weight from the forward to the
// backward. Recomputing keeps the forward as cheap as a plain forward, serves every reduction
// (reduction='none' with any per-token gradient) and keeps the backward a metalcore op that
// compiled and exported graphs show as one node, for one extra matmul.
//
// Chunks: the logits of one chunk are float32 (float64 for float64) so the loss and its
// gradient are accumulated as in cross_entropy on 16-bit logits; a chunk holds at most
// kChunkElements logits (8 MiB in float32), which bounds the extra memory independently of N.
// grad_weight of 16-bit weights is accumulated over chunks in float32 and rounded once.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "cross_entropy/cross_entropy.h"

namespace metalcore::flce {

using T = at::Tensor;
using OptT = std::optional<at::Tensor>;
using S = c10::string_view;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

inline constexpr int64_t kChunkElements = int64_t(1) << 21;

inline constexpr const char* kOp = "fused_linear_cross_entropy";
inline constexpr const char* kBackwardOp = "fused_linear_cross_entropy_backward";

// Typed handle of `ns`::`name` (found once per call: a hash lookup next to the matmuls).
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* ns, const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow((std::string(ns) + "::" + name).c_str(), "")
      .template typed<Sig>();
}

inline auto ce_op(const char* ns) {
  return find_op<T(const T&, const T&, int64_t, S, double)>(ns, "cross_entropy");
}
inline auto ce_backward_op(const char* ns) {
  return find_op<T(const T&, const T&, const T&, int64_t, S, double)>(ns, "cross_entropy_backward");
}

inline bool has(const OptT& t) { return t.has_value() && t->defined(); }

// input [N, H], weight [V, H] (V >= 1), target [N] int64, bias [V]; the targets' values.
inline cross_entropy::Reduction check_inputs(const char* op, const T& input, const T& weight,
                                             const T& target, const OptT& bias,
                                             int64_t ignore_index, S reduction,
                                             double label_smoothing) {
  check_float(op, "input", input);
  TORCH_CHECK_VALUE(input.dim() == 2, "metalcore.", op, ": 'input' must be 2-D [N, H], got shape ",
                    input.sizes());
  check_float(op, "weight", weight);
  check_same_device(op, "weight", weight, "input", input);
  check_same_dtype(op, "weight", weight, "input", input);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == input.size(1) && weight.size(0) >= 1,
                    "metalcore.", op, ": 'weight' must have shape [V, ", input.size(1),
                    "] with V >= 1 (H of 'input'), got ", weight.sizes());
  check_defined(op, "target", target);
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "metalcore.", op,
                   ": 'target' must be int64 (Long) class indices, got ", target.scalar_type());
  check_same_device(op, "target", target, "input", input);
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == input.size(0), "metalcore.", op,
                    ": 'target' must have shape [", input.size(0), "] (the N of 'input'), got ",
                    target.sizes());
  if (has(bias)) {
    check_same_device(op, "bias", *bias, "input", input);
    check_same_dtype(op, "bias", *bias, "input", input);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "metalcore.", op,
                      ": 'bias' must have shape [", weight.size(0), "] (the V of 'weight'), got ",
                      bias->sizes());
  }
  const auto red = cross_entropy::parse_reduction(op, reduction);
  cross_entropy::check_smoothing(op, label_smoothing);
  cross_entropy::check_target_values(op, target, weight.size(0), ignore_index);
  return red;
}

inline int64_t chunk_rows(int64_t n, int64_t vocab) {
  return std::max<int64_t>(1, std::min<int64_t>(n, kChunkElements / std::max<int64_t>(vocab, 1)));
}

// The chunk's logits in the accumulation dtype.
inline T chunk_logits(const T& x, const T& weight, const OptT& bias, at::ScalarType acc) {
  T logits = has(bias) ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  return logits.to(acc);
}

inline T forward(const char* ns, const T& input, const T& weight, const T& target, const OptT& bias,
                 int64_t ignore_index, S reduction, double label_smoothing) {
  const auto red =
      check_inputs(kOp, input, weight, target, bias, ignore_index, reduction, label_smoothing);
  const int64_t n = input.size(0), vocab = weight.size(0);
  const auto acc = cross_entropy::acc_type(input.scalar_type());
  const bool none = red == cross_entropy::Reduction::None;
  // One layout for the matmuls whatever the caller's strides: BLAS rounds differently per
  // layout, and a compiled graph may hand over another layout than eager did.
  const T x = input.contiguous(), w = weight.contiguous();
  T losses = none ? at::empty({n}, input.options()) : T();
  T total = at::zeros({}, input.options().dtype(acc));
  const int64_t rows = chunk_rows(n, vocab);
  for (int64_t start = 0; start < n; start += rows) {
    const int64_t c = std::min(rows, n - start);
    const T logits = chunk_logits(x.narrow(0, start, c), w, bias, acc);
    const T tc = target.narrow(0, start, c);
    if (none) {
      losses.narrow(0, start, c)
          .copy_(ce_op(ns).call(logits, tc, ignore_index, "none", label_smoothing));
    } else {
      total.add_(ce_op(ns).call(logits, tc, ignore_index, "sum", label_smoothing));
    }
  }
  if (none) return losses;
  if (red == cross_entropy::Reduction::Mean) {
    total = total / (target != ignore_index).sum().to(acc);
  }
  return total.to(input.scalar_type());
}

inline Triple backward(const char* ns, const T& grad_loss, const T& input, const T& weight,
                       const T& target, const OptT& bias, int64_t ignore_index, S reduction,
                       double label_smoothing) {
  const auto red = check_inputs(kBackwardOp, input, weight, target, bias, ignore_index, reduction,
                                label_smoothing);
  check_float(kBackwardOp, "grad_loss", grad_loss);
  check_same_device(kBackwardOp, "grad_loss", grad_loss, "input", input);
  check_same_dtype(kBackwardOp, "grad_loss", grad_loss, "input", input);
  const int64_t n = input.size(0), vocab = weight.size(0);
  const bool none = red == cross_entropy::Reduction::None;
  if (none) {
    TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == n, "metalcore.", kBackwardOp,
                      ": 'grad_loss' must have shape [", n,
                      "] (the loss of reduction 'none'), got ", grad_loss.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_loss.dim() == 0, "metalcore.", kBackwardOp,
                      ": 'grad_loss' must be 0-dim (the loss of reduction '", reduction,
                      "'), got shape ", grad_loss.sizes());
  }
  const auto dtype = input.scalar_type();
  const auto acc = cross_entropy::acc_type(dtype);
  const T x = input.contiguous(), w = weight.contiguous();  // one layout (see forward)
  const bool widen = acc != dtype;  // 16-bit: accumulate grad_weight/grad_bias in float32
  T grad_input = at::empty(input.sizes(), input.options());
  T grad_weight = at::zeros(weight.sizes(), weight.options().dtype(acc));
  T grad_bias = has(bias) ? at::zeros({vocab}, weight.options().dtype(acc)) : T();
  // 'mean' becomes 'sum' per chunk with the gradient divided by the count of all chunks' rows.
  T scale = grad_loss.to(acc);
  if (red == cross_entropy::Reduction::Mean) {
    scale = scale / (target != ignore_index).sum().to(acc);
  }
  const int64_t rows = chunk_rows(n, vocab);
  for (int64_t start = 0; start < n; start += rows) {
    const int64_t c = std::min(rows, n - start);
    const T xc = x.narrow(0, start, c);
    T grad_logits;
    {
      const T logits = chunk_logits(xc, w, bias, acc);
      grad_logits = ce_backward_op(ns).call(none ? scale.narrow(0, start, c) : scale, logits,
                                            target.narrow(0, start, c), ignore_index,
                                            none ? "none" : "sum", label_smoothing);
    }
    if (has(bias)) grad_bias.add_(grad_logits.sum(0));
    if (widen) grad_logits = grad_logits.to(dtype);
    T rows_out = grad_input.narrow(0, start, c);
    at::mm_out(rows_out, grad_logits, w);
    if (widen) {
      grad_weight.add_(at::mm(grad_logits.t(), xc));
    } else {
      grad_weight.addmm_(grad_logits.t(), xc);
    }
  }
  return {grad_input, grad_weight.to(dtype),
          has(bias) ? grad_bias.to(dtype) : at::empty({0}, input.options())};
}

}  // namespace metalcore::flce
