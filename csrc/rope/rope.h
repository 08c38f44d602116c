// RoPE family: input validation, layout and the entry points shared by the CPU and CUDA backends
// (the Metal launch layer, rope_launch.cpp, adds Metal's own limits).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "common/backend.h"
#include "common/checks.h"

namespace metalcore::rope {

struct Dims {
  int64_t batch, q_heads, k_heads, seq, head_dim, rot;
};

// Validates q/k (or their gradients, named by q_arg/k_arg) and cos/sin for `op`.
// cos/sin are float32 or q's dtype; float32 tables with 16-bit q keep the angles exact.
inline Dims check_inputs(const char* op, const char* q_arg, const at::Tensor& q, const char* k_arg,
                         const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  check_float(op, q_arg, q);
  check_float(op, k_arg, k);
  check_float(op, "cos", cos);
  check_float(op, "sin", sin);
  check_same_device(op, k_arg, k, q_arg, q);
  check_same_device(op, "cos", cos, q_arg, q);
  check_same_device(op, "sin", sin, q_arg, q);
  check_same_dtype(op, k_arg, k, q_arg, q);
  const bool reduced = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  TORCH_CHECK_TYPE(
      cos.scalar_type() == q.scalar_type() || (reduced && cos.scalar_type() == at::kFloat),
      "metalcore.", op, ": 'cos' must have the same dtype as '", q_arg, "' (", q.scalar_type(), ")",
      reduced ? " or float32" : "", ", got ", cos.scalar_type());
  check_same_dtype(op, "sin", sin, "cos", cos);

  TORCH_CHECK_VALUE(q.dim() == 4, "metalcore.", op, ": '", q_arg,
                    "' must be 4-D [batch, heads, seq, head_dim], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, "metalcore.", op, ": '", k_arg,
                    "' must be 4-D [batch, heads, seq, head_dim], got shape ", k.sizes());
  const int64_t batch = q.size(0), seq = q.size(2), head_dim = q.size(3);
  TORCH_CHECK_VALUE(k.size(0) == batch && k.size(2) == seq && k.size(3) == head_dim, "metalcore.",
                    op, ": '", k_arg, "' must have the batch, seq and head_dim of '", q_arg, "' ",
                    q.sizes(), ", got shape ", k.sizes());
  TORCH_CHECK_VALUE(cos.dim() == 2 || cos.dim() == 3, "metalcore.", op,
                    ": 'cos' must be 2-D [seq, rot] or 3-D [batch or 1, seq, rot], got shape ",
                    cos.sizes());
  check_same_shape(op, "sin", sin, "cos", cos);
  const int64_t rot = cos.size(-1);
  TORCH_CHECK_VALUE(cos.size(-2) == seq, "metalcore.", op, ": 'cos' must have seq = ", seq,
                    " (dim 2 of '", q_arg, "') in dim -2, got shape ", cos.sizes());
  TORCH_CHECK_VALUE(cos.dim() == 2 || cos.size(0) == 1 || cos.size(0) == batch, "metalcore.", op,
                    ": 'cos' must have batch 1 or ", batch, " in dim 0, got shape ", cos.sizes());
  TORCH_CHECK_VALUE(rot % 2 == 0 && rot <= head_dim, "metalcore.", op,
                    ": 'cos' last dim (rot) must be even and <= head_dim = ", head_dim, ", got ",
                    rot);
  return {batch, q.size(1), k.size(1), seq, head_dim, rot};
}

// q/k with a unit stride on head_dim (any strides elsewhere); a copy only otherwise.
inline at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.size(-1) > 1 && t.stride(-1) != 1 ? t.contiguous() : t;
}

// cos/sin as [batch or 1, seq, rot] with a unit stride on rot.
inline at::Tensor as_table(const at::Tensor& t) {
  return unit_last_stride(t.dim() == 2 ? t.unsqueeze(0) : t);
}

// ---------------------------------------------------------------------------------------------
// Entry points, written once for every backend b (rope_cpu.cpp, rope_cuda.cpp, and the Metal
// launch layer rope_launch.cpp): B::Guard, b.check(op, arg, t) for the backend's own limits (on
// q and on the tables), and
//   b.apply(q, k, cos, sin, interleaved, transpose, dims, q_out, k_out)
// with q/k of unit head_dim stride (any other strides), cos/sin as [batch or 1, seq, rot] tables
// of unit rot stride, contiguous outputs. transpose=true applies the transposed rotation (the
// backward).

template <typename B>
std::tuple<at::Tensor, at::Tensor> apply(const B& b, const char* op, const char* q_arg,
                                         const at::Tensor& q, const char* k_arg,
                                         const at::Tensor& k, const at::Tensor& cos,
                                         const at::Tensor& sin, bool interleaved, bool transpose) {
  const Dims dm = check_inputs(op, q_arg, q, k_arg, k, cos, sin);
  b.check(op, q_arg, q);
  b.check(op, "cos", cos);
  const typename B::Guard guard(q.device());
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  if (q.numel() == 0 && k.numel() == 0) return {q_out, k_out};
  b.apply(unit_last_stride(q), unit_last_stride(k), as_table(cos), as_table(sin), interleaved,
          transpose, dm, q_out, k_out);
  return {q_out, k_out};
}

template <typename B>
std::tuple<at::Tensor, at::Tensor> forward(const B& b, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& cos, const at::Tensor& sin,
                                           bool interleaved) {
  return apply(b, "rope", "q", q, "k", k, cos, sin, interleaved, /*transpose=*/false);
}

template <typename B>
std::tuple<at::Tensor, at::Tensor> backward(const B& b, const at::Tensor& grad_q_out,
                                            const at::Tensor& grad_k_out, const at::Tensor& cos,
                                            const at::Tensor& sin, bool interleaved) {
  return apply(b, "rope_backward", "grad_q_out", grad_q_out, "grad_k_out", grad_k_out, cos, sin,
               interleaved, /*transpose=*/true);
}

// Registers the family's two ops for a stateless backend B (CPU, CUDA).
template <typename B>
void register_impls(torch::Library& m) {
  using T = at::Tensor;
  m.impl("rope", [](const T& q, const T& k, const T& c, const T& s, bool interleaved) {
    return forward(B{}, q, k, c, s, interleaved);
  });
  m.impl("rope_backward", [](const T& gq, const T& gk, const T& c, const T& s, bool interleaved) {
    return backward(B{}, gq, gk, c, s, interleaved);
  });
}

}  // namespace metalcore::rope
