// embedding_bag family: validation, layout and the entry points shared by the backends (each
// binds only its kernels; see embedding_bag_cpu.cpp and embedding_bag_cuda.cpp).
//
// The entry points turn offsets into `bounds`, B + 1 int64 bag boundaries (bag b is
// [bounds[b], bounds[b + 1])), whichever include_last_offset says, and indices into contiguous
// int64, so the kernels see one layout. padding_idx is normalised to [0, V) or -1 (none).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "common/backend.h"
#include "common/checks.h"

namespace metalcore::embedding_bag {

enum class Mode : int64_t { Sum = 0, Mean = 1, Max = 2 };

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline Mode parse_mode(const char* op, std::string_view mode) {
  if (mode == "sum") return Mode::Sum;
  if (mode == "mean") return Mode::Mean;
  TORCH_CHECK_VALUE(mode == "max", "metalcore.", op,
                    ": 'mode' must be 'sum', 'mean' or 'max', got '", mode, "'");
  return Mode::Max;
}

inline void check_index_tensor(const char* op, const char* arg, const at::Tensor& t) {
  check_defined(op, arg, t);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, "metalcore.", op,
                   ": '", arg, "' must be int64 or int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, "metalcore.", op, ": '", arg, "' must be 1-D, got shape ",
                    t.sizes());
}

// What every op of the family validates: weight [V, D] float; the indices ('input' in the schema,
// as torch.nn.functional.embedding_bag names them) [N] and offsets int; the
// per_sample_weights [N] of the weight's dtype (mode 'sum' only, as torch); padding_idx in
// [-V, V). Returns the number of bags.
inline int64_t check_common(const char* op, const at::Tensor& weight, const at::Tensor& indices,
                            const at::Tensor& offsets, Mode mode,
                            const std::optional<at::Tensor>& per_sample_weights,
                            bool include_last_offset, std::optional<int64_t> padding_idx) {
  check_float(op, "weight", weight);
  TORCH_CHECK_VALUE(weight.dim() == 2, "metalcore.", op,
                    ": 'weight' must be 2-D [num_embeddings, embedding_dim], got shape ",
                    weight.sizes());
  check_index_tensor(op, "input", indices);
  check_index_tensor(op, "offsets", offsets);
  check_same_device(op, "input", indices, "weight", weight);
  check_same_device(op, "offsets", offsets, "weight", weight);
  TORCH_CHECK_TYPE(offsets.scalar_type() == indices.scalar_type(), "metalcore.", op,
                   ": 'offsets' must have the same dtype as 'input' (", indices.scalar_type(),
                   "), got ", offsets.scalar_type());
  if (present(per_sample_weights)) {
    const at::Tensor& psw = *per_sample_weights;
    check_same_device(op, "per_sample_weights", psw, "weight", weight);
    check_same_dtype(op, "per_sample_weights", psw, "weight", weight);
    TORCH_CHECK_VALUE(mode == Mode::Sum, "metalcore.", op,
                      ": 'per_sample_weights' is only supported with mode 'sum' (as torch)");
    check_same_shape(op, "per_sample_weights", psw, "input", indices);
  }
  const int64_t v = weight.size(0);
  if (padding_idx.has_value()) {
    TORCH_CHECK_VALUE(*padding_idx >= -v && *padding_idx < v, "metalcore.", op,
                      ": 'padding_idx' must be in [-", v, ", ", v, ") (the rows of 'weight'), got ",
                      *padding_idx);
  }
  if (include_last_offset) {
    TORCH_CHECK_VALUE(offsets.size(0) >= 1, "metalcore.", op,
                      ": 'offsets' must have at least one element with include_last_offset=True");
    return offsets.size(0) - 1;
  }
  return offsets.size(0);
}

inline int64_t normalized_padding(std::optional<int64_t> padding_idx, int64_t v) {
  if (!padding_idx.has_value()) return -1;
  return *padding_idx < 0 ? *padding_idx + v : *padding_idx;
}

// The bag boundaries as B + 1 contiguous int64 values, after the checks on their values (a data
// check: it reads the offsets, on any device): offsets[0] == 0, non-decreasing, at most N, and
// the last one N with include_last_offset.
inline at::Tensor bounds_of(const char* op, const at::Tensor& offsets, int64_t n,
                            bool include_last_offset) {
  at::Tensor off = offsets.to(at::kLong).contiguous();
  const int64_t count = off.size(0);
  if (count > 0) {
    const at::Tensor cpu = off.cpu();
    const int64_t* p = cpu.const_data_ptr<int64_t>();
    TORCH_CHECK_VALUE(p[0] == 0, "metalcore.", op,
                      ": 'offsets' must start at 0 (the first bag starts at the first index), "
                      "got offsets[0] = ",
                      p[0]);
    for (int64_t i = 1; i < count; ++i) {
      TORCH_CHECK_VALUE(p[i] >= p[i - 1], "metalcore.", op,
                        ": 'offsets' must be non-decreasing, got offsets[", i, "] = ", p[i],
                        " after offsets[", i - 1, "] = ", p[i - 1]);
    }
    TORCH_CHECK_VALUE(p[count - 1] <= n, "metalcore.", op,
                      ": 'offsets' must be at most len(input) = ", n, ", got ", p[count - 1]);
    // torch documents the last offset as len(input) (CSR); its kernels disagree on indices past
    // it (float32 drops them, float64 adds one to the last bag), so they are refused.
    TORCH_CHECK_VALUE(!include_last_offset || p[count - 1] == n, "metalcore.", op,
                      ": with include_last_offset=True the last offset must be len(input) = ", n,
                      " (CSR layout), got ", p[count - 1]);
  }
  return include_last_offset ? off : at::cat({off, at::full({1}, n, off.options())});
}

// The indices as contiguous int64 after the range check (out-of-range rows would read or write
// outside weight).
inline at::Tensor indices_of(const char* op, const at::Tensor& indices, int64_t v) {
  at::Tensor idx = indices.to(at::kLong).contiguous();
  if (idx.numel() == 0) return idx;
  const at::Tensor bad = (idx < 0).logical_or_(idx >= v);
  if (bad.any().item<bool>()) {
    const int64_t pos = bad.nonzero().select(1, 0)[0].item<int64_t>();
    TORCH_CHECK_VALUE(false, "metalcore.", op, ": 'input' must be in [0, ", v,
                      ") (the rows of 'weight'), got ", idx[pos].item<int64_t>(), " at position ",
                      pos);
  }
  return idx;
}

inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return present(t) ? t->contiguous() : at::Tensor();
}

// ---------------------------------------------------------------------------------------------
// Entry points, written once for every backend b:
//   B::Guard                          device guard type, constructed from the weight's device
//   b.check(op, arg, weight)          the backend's own limits
//   b.forward(weight, indices, bounds, mode, psw, padding, out)
//   b.backward(grad_out, weight, indices, bounds, mode, psw, padding, grad_weight, grad_psw)
// weight [V, D] and grad_out [B, D] contiguous, indices [N] and bounds [B + 1] contiguous int64,
// psw [N] or undefined, padding in [0, V) or -1, grad_psw [N] or undefined. Nothing is called when
// B == 0 or D == 0.

using Pair = std::tuple<at::Tensor, at::Tensor>;

template <typename B>
at::Tensor forward(const B& b, const at::Tensor& weight, const at::Tensor& indices,
                   const at::Tensor& offsets, std::string_view mode_name,
                   const std::optional<at::Tensor>& per_sample_weights, bool include_last_offset,
                   std::optional<int64_t> padding_idx) {
  const char* op = "embedding_bag";
  const Mode mode = parse_mode(op, mode_name);
  const int64_t bags = check_common(op, weight, indices, offsets, mode, per_sample_weights,
                                    include_last_offset, padding_idx);
  b.check(op, "weight", weight);
  const typename B::Guard guard(weight.device());
  const int64_t v = weight.size(0), d = weight.size(1);
  const at::Tensor idx = indices_of(op, indices, v);
  const at::Tensor bounds = bounds_of(op, offsets, indices.size(0), include_last_offset);
  at::Tensor out = at::empty({bags, d}, weight.options());
  if (bags == 0 || d == 0) return out;
  b.forward(weight.contiguous(), idx, bounds, mode, contiguous_or_undefined(per_sample_weights),
            normalized_padding(padding_idx, v), out);
  return out;
}

template <typename B>
Pair backward(const B& b, const at::Tensor& grad_out, const at::Tensor& weight,
              const at::Tensor& indices, const at::Tensor& offsets, std::string_view mode_name,
              const std::optional<at::Tensor>& per_sample_weights, bool include_last_offset,
              std::optional<int64_t> padding_idx) {
  const char* op = "embedding_bag_backward";
  const Mode mode = parse_mode(op, mode_name);
  const int64_t bags = check_common(op, weight, indices, offsets, mode, per_sample_weights,
                                    include_last_offset, padding_idx);
  const int64_t v = weight.size(0), d = weight.size(1);
  check_float(op, "grad_out", grad_out);
  check_same_device(op, "grad_out", grad_out, "weight", weight);
  check_same_dtype(op, "grad_out", grad_out, "weight", weight);
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == bags && grad_out.size(1) == d,
                    "metalcore.", op, ": 'grad_out' must have shape [", bags, ", ", d,
                    "] (bags x embedding_dim), got ", grad_out.sizes());
  b.check(op, "weight", weight);
  const typename B::Guard guard(weight.device());
  const at::Tensor idx = indices_of(op, indices, v);
  const at::Tensor bounds = bounds_of(op, offsets, indices.size(0), include_last_offset);
  const bool has_psw = present(per_sample_weights);
  at::Tensor grad_weight = at::empty({v, d}, weight.options());
  at::Tensor grad_psw = at::empty({has_psw ? indices.size(0) : 0}, weight.options());
  if (bags == 0 || d == 0) {
    grad_weight.zero_();
    grad_psw.zero_();
    return {grad_weight, grad_psw};
  }
  b.backward(grad_out.contiguous(), weight.contiguous(), idx, bounds, mode,
             contiguous_or_undefined(per_sample_weights), normalized_padding(padding_idx, v),
             grad_weight, has_psw ? grad_psw : at::Tensor());
  return {grad_weight, grad_psw};
}

// Registers the family's ops for a stateless backend B (CPU, CUDA).
template <typename B>
void register_impls(torch::Library& m) {
  using T = at::Tensor;
  using OptT = std::optional<at::Tensor>;
  m.impl("embedding_bag", [](const T& w, const T& idx, const T& off, c10::string_view mode,
                             const OptT& psw, bool last, std::optional<int64_t> pad) {
    return forward(B{}, w, idx, off, std::string_view(mode.data(), mode.size()), psw, last, pad);
  });
  m.impl("embedding_bag_backward",
         [](const T& g, const T& w, const T& idx, const T& off, c10::string_view mode,
            const OptT& psw, bool last, std::optional<int64_t> pad) {
           return backward(B{}, g, w, idx, off, std::string_view(mode.data(), mode.size()), psw,
                           last, pad);
         });
}

}  // namespace metalcore::embedding_bag
