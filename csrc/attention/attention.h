// Attention family: input validation, layout and the entry points shared by every backend
// (attention_cpu.cpp binds the CPU kernels). Semantics are in csrc/ops.def.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>

#include "common/backend.h"
#include "common/checks.h"

namespace metalcore::attention {

struct Dims {
  int64_t batch, q_heads, kv_heads, lq, lk, d, dv;
};

// Which keys a query row sees, besides the mask: a contiguous range [lo(i), hi(i)).
struct Visibility {
  int64_t lq = 0, lk = 0;
  bool causal = false;
  int64_t left = -1, right = -1;

  int64_t lo(int64_t i) const {
    if (left < 0) return 0;
    return std::max<int64_t>(0, i + (lk - lq) - left);
  }
  int64_t hi(int64_t i) const {
    int64_t h = lk;
    if (causal) h = std::min(h, i + 1);  // top-left diagonal, as F.sdpa
    if (right >= 0) h = std::min(h, std::max<int64_t>(0, i + (lk - lq) + right + 1));
    return h;
  }
};

// Everything the kernels need besides the tensors.
struct Params {
  Dims dims;
  Visibility vis;
  double scale;
};

// float32 for the 16-bit types and float32, float64 for float64: the dtype of lse.
inline at::ScalarType lse_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_4d(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 4, "metalcore.", op, ": '", arg,
                    "' must be 4-D [batch, heads, seq, head_dim], got shape ", t.sizes());
}

// Validates q/k/v, the mask and the flags of `op` (the forward and the backward share them).
inline Params check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const std::optional<at::Tensor>& mask,
                           std::optional<double> scale, bool is_causal, int64_t window_left,
                           int64_t window_right) {
  check_float(op, "q", q);
  check_float(op, "k", k);
  check_float(op, "v", v);
  check_same_device(op, "k", k, "q", q);
  check_same_device(op, "v", v, "q", q);
  check_same_dtype(op, "k", k, "q", q);
  check_same_dtype(op, "v", v, "q", q);
  const bool has_mask = mask.has_value() && mask->defined();
  if (has_mask) {
    check_same_device(op, "attn_mask", *mask, "q", q);
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool || mask->scalar_type() == q.scalar_type(),
                     "metalcore.", op, ": 'attn_mask' must be bool or have the dtype of 'q' (",
                     q.scalar_type(), "), got ", mask->scalar_type());
  }
  check_4d(op, "q", q);
  check_4d(op, "k", k);
  check_4d(op, "v", v);
  const int64_t b = q.size(0), hq = q.size(1), lq = q.size(2), d = q.size(3);
  const int64_t hkv = k.size(1), lk = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == b && k.size(3) == d, "metalcore.", op,
                    ": 'k' must have the batch and head_dim of 'q' ", q.sizes(), ", got shape ",
                    k.sizes());
  TORCH_CHECK_VALUE(v.size(0) == b && v.size(1) == hkv && v.size(2) == lk, "metalcore.", op,
                    ": 'v' must have the batch, heads and seq of 'k' ", k.sizes(), ", got shape ",
                    v.sizes());
  TORCH_CHECK_VALUE(hkv == 0 ? hq == 0 : hq % hkv == 0, "metalcore.", op, ": the heads of 'k' (",
                    hkv, ") must divide the heads of 'q' (", hq, ")");
  if (has_mask) {
    const std::array<int64_t, 4> target{b, hq, lq, lk};
    bool ok = mask->dim() <= 4;
    for (int64_t i = 0; ok && i < mask->dim(); ++i) {
      const int64_t s = mask->size(mask->dim() - 1 - i), t = target[3 - i];
      ok = s == 1 || s == t;
    }
    TORCH_CHECK_VALUE(ok, "metalcore.", op,
                      ": 'attn_mask' must be broadcastable to [batch, q_heads, q_seq, kv_seq] = ",
                      at::IntArrayRef(target), ", got shape ", mask->sizes());
  }
  TORCH_CHECK_VALUE(!scale.has_value() || std::isfinite(*scale), "metalcore.", op,
                    ": 'scale' must be finite, got ", scale.value_or(0.0));
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, "metalcore.", op,
                    ": 'window_left' and 'window_right' must be >= -1 (-1: unbounded), got (",
                    window_left, ", ", window_right, ")");
  TORCH_CHECK_VALUE(!is_causal || (window_left == -1 && window_right == -1), "metalcore.", op,
                    ": 'is_causal' (top-left) cannot be combined with a window (bottom-right); "
                    "use window_left=-1, window_right=0 for bottom-right causal");
  TORCH_CHECK_VALUE(!is_causal || !has_mask, "metalcore.", op,
                    ": 'is_causal' cannot be combined with 'attn_mask' (fold the causal mask into "
                    "it)");
  Params p;
  p.dims = {b, hq, hkv, lq, lk, d, v.size(3)};
  p.vis = {lq, lk, is_causal, window_left, window_right};
  // No head dim, no score: any finite scale gives the same (zero) scores.
  p.scale = scale.has_value() ? *scale : (d > 0 ? 1.0 / std::sqrt(static_cast<double>(d)) : 1.0);
  return p;
}

// q/k/v/grad_out/out with a unit stride on head_dim (any strides elsewhere); a copy otherwise.
inline at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.size(-1) > 1 && t.stride(-1) != 1 ? t.contiguous() : t;
}

// The mask as a [B, Hq, Lq, Lk] view (stride 0 along broadcast dims), or undefined.
inline at::Tensor expanded_mask(const std::optional<at::Tensor>& mask, const Dims& dm) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  return mask->expand({dm.batch, dm.q_heads, dm.lq, dm.lk});
}

// ---------------------------------------------------------------------------------------------
// Entry points, written once for every backend b: B::Guard, b.check(op, arg, t) for its own
// limits, and
//   b.forward(q, k, v, mask, params, out, lse)
//   b.backward(grad_out, grad_lse, q, k, v, out, lse, mask, params, dq, dk, dv)
// with q/k/v/grad_out/out of unit head_dim stride (any other strides), the mask expanded to
// [B, Hq, Lq, Lk] (or undefined), grad_lse undefined or of lse's shape, contiguous outputs.

template <typename B>
std::tuple<at::Tensor, at::Tensor> forward(const B& b, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v,
                                           const std::optional<at::Tensor>& mask,
                                           std::optional<double> scale, bool is_causal,
                                           int64_t window_left, int64_t window_right) {
  const char* op = "attention";
  const Params p = check_inputs(op, q, k, v, mask, scale, is_causal, window_left, window_right);
  b.check(op, "q", q);
  const typename B::Guard guard(q.device());
  const Dims& dm = p.dims;
  at::Tensor out = at::empty({dm.batch, dm.q_heads, dm.lq, dm.dv}, q.options());
  at::Tensor lse =
      at::empty({dm.batch, dm.q_heads, dm.lq}, q.options().dtype(lse_dtype(q.scalar_type())));
  if (lse.numel() == 0) return {out, lse};
  b.forward(unit_last_stride(q), unit_last_stride(k), unit_last_stride(v), expanded_mask(mask, dm),
            p, out, lse);
  return {out, lse};
}

template <typename B>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const B& b, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, std::optional<double> scale,
    bool is_causal, int64_t window_left, int64_t window_right) {
  const char* op = "attention_backward";
  const Params p = check_inputs(op, q, k, v, mask, scale, is_causal, window_left, window_right);
  const Dims& dm = p.dims;
  const std::vector<int64_t> out_shape{dm.batch, dm.q_heads, dm.lq, dm.dv};
  const std::vector<int64_t> lse_shape{dm.batch, dm.q_heads, dm.lq};
  const auto lse_type = lse_dtype(q.scalar_type());
  for (const auto& [arg, t] :
       {std::pair<const char*, const at::Tensor*>{"grad_out", &grad_out}, {"out", &out}}) {
    check_float(op, arg, *t);
    check_same_device(op, arg, *t, "q", q);
    check_same_dtype(op, arg, *t, "q", q);
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(out_shape), "metalcore.", op, ": '", arg,
                      "' must have shape [batch, q_heads, q_seq, v_head_dim] = ",
                      at::IntArrayRef(out_shape), ", got ", t->sizes());
  }
  const bool has_glse = grad_lse.has_value() && grad_lse->defined();
  for (const auto& [arg, t] : {std::pair<const char*, const at::Tensor*>{"lse", &lse},
                               {"grad_lse", has_glse ? &*grad_lse : nullptr}}) {
    if (t == nullptr) continue;
    check_defined(op, arg, *t);
    check_same_device(op, arg, *t, "q", q);
    TORCH_CHECK_TYPE(t->scalar_type() == lse_type, "metalcore.", op, ": '", arg, "' must be ",
                     lse_type, " (lse's dtype for ", q.scalar_type(), " inputs), got ",
                     t->scalar_type());
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(lse_shape), "metalcore.", op, ": '", arg,
                      "' must have shape [batch, q_heads, q_seq] = ", at::IntArrayRef(lse_shape),
                      ", got ", t->sizes());
  }
  b.check(op, "q", q);
  const typename B::Guard guard(q.device());
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (dq.numel() == 0 && dk.numel() == 0 && dv.numel() == 0) return {dq, dk, dv};
  b.backward(unit_last_stride(grad_out), has_glse ? grad_lse->contiguous() : at::Tensor(),
             unit_last_stride(q), unit_last_stride(k), unit_last_stride(v), unit_last_stride(out),
             lse.contiguous(), expanded_mask(mask, dm), p, dq, dk, dv);
  return {dq, dk, dv};
}

// Registers the family's ops for a stateless backend B (CPU).
template <typename B>
void register_impls(torch::Library& m) {
  using T = at::Tensor;
  using OptT = std::optional<at::Tensor>;
  m.impl("attention", [](const T& q, const T& k, const T& v, const OptT& mask,
                         std::optional<double> scale, bool is_causal, int64_t left, int64_t right) {
    return forward(B{}, q, k, v, mask, scale, is_causal, left, right);
  });
  m.impl("attention_backward",
         [](const T& grad_out, const OptT& grad_lse, const T& q, const T& k, const T& v,
            const T& out, const T& lse, const OptT& mask, std::optional<double> scale,
            bool is_causal, int64_t left, int64_t right) {
           return backward(B{}, grad_out, grad_lse, q, k, v, out, lse, mask, scale, is_causal, left,
                           right);
         });
}

}  // namespace metalcore::attention
