// Weight-only quantization family: validation, layout and the entry points shared by every
// backend (the kernels only bind, see quant_cpu.cpp). Formats are described in ops.def and
// quant_format.h; metalcore/_fakes.py mirrors every check here with the same messages.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "common/backend.h"
#include "common/checks.h"
#include "quant/quant_format.h"

namespace metalcore::quant {

inline const char* format_name(Format f) {
  switch (f) {
    case Format::Int4:
      return "int4";
    case Format::Int8:
      return "int8";
    case Format::Q4_0:
      return "Q4_0";
    case Format::Q8_0:
      return "Q8_0";
    case Format::Q4_K:
      return "Q4_K";
    case Format::Q6_K:
      return "Q6_K";
  }
  return "?";
}

inline void check_uint8_matrix(const char* op, const char* arg, const at::Tensor& t,
                               const char* ref_arg, const at::Tensor& ref, const char* shape) {
  check_defined(op, arg, t);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kByte, "metalcore.", op, ": '", arg,
                   "' must be uint8, got ", t.scalar_type());
  check_same_device(op, arg, t, ref_arg, ref);
  TORCH_CHECK_VALUE(t.dim() == 2, "metalcore.", op, ": '", arg, "' must be 2-D ", shape,
                    ", got shape ", t.sizes());
}

// The affine formats: qweight uint8 [N, K/2] (INT4) or [N, K] (INT8), scales and biases
// [N, K/group_size] of one float dtype. `ref` (named ref_arg) is the op's primary tensor, the
// one every other tensor must share a device with.
inline QWeight check_affine(const char* op, int bits, const at::Tensor& qweight,
                            const at::Tensor& scales, const at::Tensor& biases, int64_t group,
                            const char* ref_arg, const at::Tensor& ref) {
  check_uint8_matrix(op, "qweight", qweight, ref_arg, ref,
                     bits == 4 ? "[out_features, in_features / 2]" : "[out_features, in_features]");
  check_float(op, "scales", scales);
  check_same_device(op, "scales", scales, ref_arg, ref);
  check_float(op, "biases", biases);
  check_same_device(op, "biases", biases, ref_arg, ref);
  check_same_dtype(op, "biases", biases, "scales", scales);
  TORCH_CHECK_VALUE(group == 32 || group == 64 || group == 128, "metalcore.", op,
                    ": 'group_size' must be 32, 64 or 128, got ", group);
  const int64_t n = qweight.size(0);
  const int64_t k = qweight.size(1) * (bits == 4 ? 2 : 1);
  TORCH_CHECK_VALUE(k % group == 0, "metalcore.", op, ": in_features (", k,
                    ", from 'qweight') must be a multiple of 'group_size' (", group, ")");
  TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == k / group,
                    "metalcore.", op, ": 'scales' must have shape [", n, ", ", k / group,
                    "] (out_features, in_features / group_size), got ", scales.sizes());
  check_same_shape(op, "biases", biases, "scales", scales);
  return {bits == 4 ? Format::Int4 : Format::Int8,
          n,
          k,
          group,
          qweight.contiguous(),
          scales.contiguous(),
          biases.contiguous()};
}

inline QWeight check_gguf(const char* op, const at::Tensor& data, int64_t qtype,
                          const char* ref_arg, const at::Tensor& ref) {
  check_uint8_matrix(op, "data", data, ref_arg, ref, "[out_features, row_bytes]");
  Format f;
  int64_t block, bytes;
  if (qtype == kGgmlQ4_0) {
    f = Format::Q4_0, block = kQ4_0Block, bytes = kQ4_0Bytes;
  } else if (qtype == kGgmlQ8_0) {
    f = Format::Q8_0, block = kQ8_0Block, bytes = kQ8_0Bytes;
  } else if (qtype == kGgmlQ4_K) {
    f = Format::Q4_K, block = kQ4_KBlock, bytes = kQ4_KBytes;
  } else if (qtype == kGgmlQ6_K) {
    f = Format::Q6_K, block = kQ6_KBlock, bytes = kQ6_KBytes;
  } else {
    TORCH_CHECK_VALUE(false, "metalcore.", op,
                      ": 'qtype' must be a supported ggml type: 2 (Q4_0), 8 (Q8_0), 12 (Q4_K) "
                      "or 14 (Q6_K), got ",
                      qtype);
  }
  TORCH_CHECK_VALUE(data.size(1) % bytes == 0, "metalcore.", op, ": each row of 'data' must be ",
                    "whole ", format_name(f), " blocks (a multiple of ", bytes, " bytes), got ",
                    data.size(1), " bytes");
  return {f, data.size(0), data.size(1) / bytes * block, block, data.contiguous(), {}, {}};
}

// The activation (or grad_out) of a linear op: a float tensor [..., size] with size == want.
inline void check_activation(const char* op, const char* arg, const at::Tensor& x, int64_t want,
                             const char* what) {
  check_float(op, arg, x);
  check_dim_at_least(op, arg, x, 1);
  TORCH_CHECK_VALUE(x.size(-1) == want, "metalcore.", op, ": the last dim of '", arg, "' must be ",
                    want, " (the weight's ", what, "), got shape ", x.sizes());
}

inline at::Tensor check_bias(const char* op, const std::optional<at::Tensor>& bias,
                             const at::Tensor& input, int64_t n) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  check_float(op, "bias", *bias);
  check_same_device(op, "bias", *bias, "input", input);
  check_same_dtype(op, "bias", *bias, "input", input);
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "metalcore.", op,
                    ": 'bias' must have shape [", n, "] (out_features), got ", bias->sizes());
  return bias->contiguous();
}

// ---------------------------------------------------------------------------------------------
// Entry points, written once for every backend b:
//   B::Guard                          device guard type, constructed from the primary device
//   b.check(op, arg, t)               the backend's own limits on the primary tensor
//   b.dequantize(w, out)              out [n, k] (any float dtype) = W
//   b.linear(x, w, bias, out)         out [m, n] = x [m, k] @ W^T (+ bias), x contiguous
//   b.linear_backward(g, w, out)      out [m, k] = g [m, n] @ W, g contiguous
// Sizes are non-zero when the kernels are called.

template <typename B>
at::Tensor dequantize(const B& b, const char* op, const QWeight& w, at::ScalarType dtype,
                      const char* arg, const at::Tensor& primary) {
  b.check(op, arg, primary);
  const typename B::Guard guard(primary.device());
  at::Tensor out = at::empty({w.n, w.k}, primary.options().dtype(dtype));
  if (out.numel() == 0) return out;
  b.dequantize(w, out);
  return out;
}

template <typename B>
at::Tensor linear(const B& b, const char* op, const at::Tensor& input, const QWeight& w,
                  const std::optional<at::Tensor>& bias_opt) {
  check_activation(op, "input", input, w.k, "in_features");
  const at::Tensor bias = check_bias(op, bias_opt, input, w.n);
  b.check(op, "input", input);
  const typename B::Guard guard(input.device());
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = w.n;
  at::Tensor out = at::empty(shape, input.options());
  if (out.numel() == 0) return out;
  if (w.k == 0) {
    // An empty reduction: the bias alone (or zeros).
    if (bias.defined()) {
      out.copy_(bias.expand(out.sizes()));
    } else {
      out.zero_();
    }
    return out;
  }
  b.linear(input.reshape({-1, w.k}).contiguous(), w, bias, out.view({-1, w.n}));
  return out;
}

template <typename B>
at::Tensor linear_backward(const B& b, const char* op, const at::Tensor& grad_out,
                           const QWeight& w) {
  check_activation(op, "grad_out", grad_out, w.n, "out_features");
  b.check(op, "grad_out", grad_out);
  const typename B::Guard guard(grad_out.device());
  std::vector<int64_t> shape(grad_out.sizes().begin(), grad_out.sizes().end());
  shape.back() = w.k;
  at::Tensor out = at::empty(shape, grad_out.options());
  if (out.numel() == 0) return out;
  if (w.n == 0) return out.zero_();
  b.linear_backward(grad_out.reshape({-1, w.n}).contiguous(), w, out.view({-1, w.k}));
  return out;
}

inline at::ScalarType gguf_dtype(const char* op, std::optional<at::ScalarType> dtype) {
  const at::ScalarType t = dtype.value_or(at::kFloat);
  TORCH_CHECK_TYPE(is_supported_float(t), "metalcore.", op,
                   ": 'dtype' must be float16, bfloat16, float32 or float64, got ", t);
  return t;
}

template <typename B, int Bits>
struct AffineOps {
  static constexpr const char* kDeq = Bits == 4 ? "int4_dequantize" : "int8_dequantize";
  static constexpr const char* kLin = Bits == 4 ? "int4_linear" : "int8_linear";
  static constexpr const char* kBwd = Bits == 4 ? "int4_linear_backward" : "int8_linear_backward";
  static at::Tensor deq(const at::Tensor& q, const at::Tensor& s, const at::Tensor& z, int64_t g) {
    const QWeight w = check_affine(kDeq, Bits, q, s, z, g, "qweight", q);
    return dequantize(B{}, kDeq, w, s.scalar_type(), "qweight", q);
  }
  static at::Tensor lin(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s,
                        const at::Tensor& z, int64_t g, const std::optional<at::Tensor>& bias) {
    return linear(B{}, kLin, x, check_affine(kLin, Bits, q, s, z, g, "input", x), bias);
  }
  static at::Tensor bwd(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& s,
                        const at::Tensor& z, int64_t g) {
    return linear_backward(B{}, kBwd, grad, check_affine(kBwd, Bits, q, s, z, g, "grad_out", grad));
  }
};

template <typename B>
at::Tensor gguf_dequantize_impl(const at::Tensor& data, int64_t qtype,
                                std::optional<at::ScalarType> dtype) {
  const char* op = "gguf_dequantize";
  const QWeight w = check_gguf(op, data, qtype, "data", data);
  return dequantize(B{}, op, w, gguf_dtype(op, dtype), "data", data);
}

template <typename B>
at::Tensor gguf_linear_impl(const at::Tensor& x, const at::Tensor& data, int64_t qtype,
                            const std::optional<at::Tensor>& bias) {
  const char* op = "gguf_linear";
  return linear(B{}, op, x, check_gguf(op, data, qtype, "input", x), bias);
}

template <typename B>
at::Tensor gguf_linear_backward_impl(const at::Tensor& grad, const at::Tensor& data,
                                     int64_t qtype) {
  const char* op = "gguf_linear_backward";
  return linear_backward(B{}, op, grad, check_gguf(op, data, qtype, "grad_out", grad));
}

// Registers the family's ops for a stateless backend B (CPU, CUDA).
template <typename B>
void register_impls(torch::Library& m) {
  m.impl("int4_dequantize", &AffineOps<B, 4>::deq);
  m.impl("int4_linear", &AffineOps<B, 4>::lin);
  m.impl("int4_linear_backward", &AffineOps<B, 4>::bwd);
  m.impl("int8_dequantize", &AffineOps<B, 8>::deq);
  m.impl("int8_linear", &AffineOps<B, 8>::lin);
  m.impl("int8_linear_backward", &AffineOps<B, 8>::bwd);
  m.impl("gguf_dequantize", &gguf_dequantize_impl<B>);
  m.impl("gguf_linear", &gguf_linear_impl<B>);
  m.impl("gguf_linear_backward", &gguf_linear_backward_impl<B>);
}

}  // namespace metalcore::quant
