// Cross-entropy family: validation, layout and the entry points shared by the CPU and CUDA
// backends (the Metal launch layer, cross_entropy_launch.cpp, adds Metal's own limits).
//
// cross_entropy(input [N, C], target [N] int64) follows torch.nn.functional.cross_entropy with
// class-index targets: per row, loss = (1 - eps) (lse - x[t]) + eps (lse - mean(x)) with
// lse = log(sum(exp(x))) and eps the label smoothing; rows whose target is ignore_index give 0 and
// do not count in 'mean' (so an all-ignored batch's mean is 0 / 0 = NaN, as in torch).
// The kernels compute per-row losses in float32 (float64 for float64 input) and the entry point
// reduces them; the backward kernel takes a per-row gradient scale and writes
//   d input[i, j] = scale[i] (softmax(x_i)[j] - (1 - eps) [j == t_i] - eps / C)
// re-deriving the row's max and sum of exponentials from the logits (one more read of a row that
// is in cache) instead of keeping a float32 lse from the forward, whose extra output would be the
// only one of another dtype than the input.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string_view>

#include "common/backend.h"
#include "common/checks.h"

namespace metalcore::cross_entropy {

enum class Reduction { None, Sum, Mean };

inline Reduction parse_reduction(const char* op, std::string_view r) {
  TORCH_CHECK_VALUE(r == "none" || r == "sum" || r == "mean", "metalcore.", op,
                    ": 'reduction' must be 'none', 'sum' or 'mean', got '", r, "'");
  return r == "none" ? Reduction::None : r == "sum" ? Reduction::Sum : Reduction::Mean;
}

inline void check_smoothing(const char* op, double label_smoothing) {
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, "metalcore.", op,
                    ": 'label_smoothing' must be in [0, 1], got ", label_smoothing);
}

// input [N, C] float, C >= 1; target [N] int64 on input's device.
inline void check_logits_target(const char* op, const at::Tensor& input, const at::Tensor& target,
                                const char* input_name = "input") {
  check_float(op, input_name, input);
  TORCH_CHECK_VALUE(input.dim() == 2, "metalcore.", op, ": '", input_name,
                    "' must be 2-D [N, C], got shape ", input.sizes());
  TORCH_CHECK_VALUE(input.size(1) >= 1, "metalcore.", op, ": '", input_name,
                    "' must have at least one class (C >= 1), got shape ", input.sizes());
  check_defined(op, "target", target);
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "metalcore.", op,
                   ": 'target' must be int64 (Long) class indices, got ", target.scalar_type());
  check_same_device(op, "target", target, input_name, input);
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == input.size(0), "metalcore.", op,
                    ": 'target' must have shape [", input.size(0), "] (the N of '", input_name,
                    "'), got ", target.sizes());
}

// Every target is a class index in [0, C) or ignore_index. A value check: it reads the targets
// (on a GPU, a synchronization, as the message of an out-of-range index needs the value).
inline void check_target_values(const char* op, const at::Tensor& target, int64_t classes,
                                int64_t ignore_index) {
  if (target.numel() == 0) return;
  const at::Tensor bad =
      (target != ignore_index).logical_and((target < 0).logical_or(target >= classes));
  if (!bad.any().item<bool>()) return;
  const int64_t pos = bad.nonzero().select(1, 0)[0].item<int64_t>();
  TORCH_CHECK_VALUE(false, "metalcore.", op, ": 'target' must hold class indices in [0, ", classes,
                    ") or ignore_index (", ignore_index, "), got ", target[pos].item<int64_t>(),
                    " at position ", pos);
}

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Rows with unit stride on C (a view when the layout allows it).
inline at::Tensor as_rows(const at::Tensor& t) {
  return t.stride(1) == 1 || t.size(1) <= 1 ? t : t.contiguous();
}

// ---------------------------------------------------------------------------------------------
// Entry points, written once for every backend b (cross_entropy_cpu.cpp, cross_entropy_cuda.cpp
// and the Metal launch layer): B::Guard, b.check(op, arg, x), and on x [N, C] with unit stride on
// C, target [N] contiguous int64:
//   b.forward(x, target, ignore_index, smoothing, losses)          losses [N] acc dtype
//   b.backward(scale, x, target, ignore_index, smoothing, grad_in)  scale [N] acc dtype

template <typename B>
at::Tensor forward(const B& b, const at::Tensor& input, const at::Tensor& target,
                   int64_t ignore_index, c10::string_view reduction, double label_smoothing) {
  const char* op = "cross_entropy";
  check_logits_target(op, input, target);
  const Reduction red = parse_reduction(op, reduction);
  check_smoothing(op, label_smoothing);
  b.check(op, "input", input);
  const typename B::Guard guard(input.device());
  const int64_t n = input.size(0), c = input.size(1);
  check_target_values(op, target, c, ignore_index);
  at::Tensor losses = at::zeros({n}, input.options().dtype(acc_type(input.scalar_type())));
  if (n > 0) {
    b.forward(as_rows(input), target.contiguous(), ignore_index, label_smoothing, losses);
  }
  if (red == Reduction::None) return losses.to(input.scalar_type());
  at::Tensor total = losses.sum();
  if (red == Reduction::Mean) total = total / (target != ignore_index).sum().to(total.dtype());
  return total.to(input.scalar_type());
}

template <typename B>
at::Tensor backward(const B& b, const at::Tensor& grad_loss, const at::Tensor& input,
                    const at::Tensor& target, int64_t ignore_index, c10::string_view reduction,
                    double label_smoothing) {
  const char* op = "cross_entropy_backward";
  check_logits_target(op, input, target);
  const Reduction red = parse_reduction(op, reduction);
  check_smoothing(op, label_smoothing);
  check_float(op, "grad_loss", grad_loss);
  check_same_device(op, "grad_loss", grad_loss, "input", input);
  check_same_dtype(op, "grad_loss", grad_loss, "input", input);
  const int64_t n = input.size(0), c = input.size(1);
  if (red == Reduction::None) {
    TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == n, "metalcore.", op,
                      ": 'grad_loss' must have shape [", n,
                      "] (the loss of reduction 'none'), got ", grad_loss.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_loss.dim() == 0, "metalcore.", op,
                      ": 'grad_loss' must be 0-dim (the loss of reduction '", reduction,
                      "'), got shape ", grad_loss.sizes());
  }
  b.check(op, "input", input);
  const typename B::Guard guard(input.device());
  check_target_values(op, target, c, ignore_index);
  at::Tensor grad_input = at::empty({n, c}, input.options());
  if (n == 0) return grad_input;
  // The per-row scale of the gradient: grad_loss itself, broadcast, or divided by the number of
  // counted rows (on the device: no synchronization).
  at::Tensor scale = grad_loss.to(acc_type(input.scalar_type()));
  if (red == Reduction::Mean) scale = scale / (target != ignore_index).sum().to(scale.dtype());
  scale = scale.expand({n}).contiguous();
  b.backward(scale, as_rows(input), target.contiguous(), ignore_index, label_smoothing, grad_input);
  return grad_input;
}

// Registers the family's two ops for a stateless backend B (CPU, CUDA).
template <typename B>
void register_impls(torch::Library& m) {
  using T = at::Tensor;
  using S = c10::string_view;
  m.impl("cross_entropy", [](const T& x, const T& t, int64_t ig, S r, double ls) {
    return forward(B{}, x, t, ig, r, ls);
  });
  m.impl("cross_entropy_backward", [](const T& g, const T& x, const T& t, int64_t ig, S r,
                                      double ls) { return backward(B{}, g, x, t, ig, r, ls); });
}

}  // namespace metalcore::cross_entropy
