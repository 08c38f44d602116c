// Weight-only quantization launch layer: the Metal backend of the family's shared entry points
// (quant.h): Metal's limits, the choice of kernel, grid sizes and argument binding, written once
// against Encoder. Per dtype, and per format (quant_format.h) where the decode is the cost:
//   dequantize_<fmt>  one thread per run of 8 weights;
//   gemv_<fmt>        linear with m <= kGemvMaxRows: 8 weight rows per threadgroup, each weight
//                     decoded once into registers and applied to every activation row;
//   gemm              linear with more rows: 32 x 32 output tiles, the weight tile dequantized
//                     into threadgroup memory and reused by 32 activation rows (the format is
//                     a parameter);
//   bwd               linear_backward (grad_input = grad @ W): the tiled kernel with the weight
//                     tile read untransposed, for every m.
#include <ATen/ATen.h>

#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "common/kernel_name.h"
#include "common/metal_registration.h"
#include "kernels/quant.h"
#include "quant/quant.h"

namespace metalcore::launch {
namespace {

using namespace quant_k;
using quant::Format;
using quant::QWeight;

constexpr const char* kFormatVariants[] = {"dequantize", "gemv"};  // one kernel per format
constexpr const char* kTiledVariants[] = {"gemm", "bwd"};          // the format at run time
constexpr const char* kFormats[] = {"int4", "int8", "q4_0", "q8_0", "q4_k", "q6_k"};

// Host-name token of a format (the order of Format, which quant.h's kInt4 .. kQ6_K mirror).
const char* format_token(Format f) { return kFormats[static_cast<int>(f)]; }
// Params::format carries the Format value itself: the kernels' constants must match it.
static_assert(static_cast<int>(Format::Int4) == kInt4 && static_cast<int>(Format::Int8) == kInt8 &&
              static_cast<int>(Format::Q4_0) == kQ4_0 && static_cast<int>(Format::Q8_0) == kQ8_0 &&
              static_cast<int>(Format::Q4_K) == kQ4_K && static_cast<int>(Format::Q6_K) == kQ6_K);

unsigned param_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return kParamHalf;
    case at::kBFloat16:
      return kParamBFloat;
    default:
      return kParamFloat;
  }
}

constexpr int64_t kMax32 = std::numeric_limits<uint32_t>::max();

// Grids and the kernels' row and column indices are 32-bit (offsets are computed in 64 bits).
void check_sizes(const char* op, const QWeight& w, int64_t m) {
  TORCH_CHECK_VALUE(w.n <= kMax32 && w.k <= kMax32 && m <= kMax32, "metalcore.", op,
                    ": at most 2^32 - 1 rows and columns on the Metal backend, got a [", w.n, ", ",
                    w.k, "] weight and ", m, " activation rows");
}

Params make_params(const QWeight& w, int64_t m, bool has_bias) {
  Params p{};
  p.row_bytes = static_cast<uint64_t>(w.data.size(1));
  p.m = static_cast<uint32_t>(m);
  p.n = static_cast<uint32_t>(w.n);
  p.k = static_cast<uint32_t>(w.k);
  p.group = static_cast<uint32_t>(w.group);
  p.param_dtype = w.scales.defined() ? param_dtype(w.scales) : kParamFloat;
  p.flags = has_bias ? kHasBias : 0u;
  p.format = static_cast<uint32_t>(w.format);
  return p;
}

// Binds the weight at 0 (dequantize) or 1 (linear): data, scales, biases. The GGUF formats have
// no scales and biases tensors; their slots get the data, which those kernels never read there.
void bind_weight(Encoder& enc, unsigned first, const QWeight& w) {
  enc.set_tensor(first, w.data);
  enc.set_tensor(first + 1, w.scales.defined() ? w.scales : w.data);
  enc.set_tensor(first + 2, w.biases.defined() ? w.biases : w.data);
}

// The kernels run fixed threadgroup sizes; a pipeline that allows fewer threads cannot run them.
void require_threads(Encoder& enc, const std::string& name, uint32_t threads) {
  TORCH_CHECK(enc.max_threads_per_threadgroup() >= threads, "metalcore: Metal kernel '", name,
              "' needs ", threads, " threads per threadgroup, the pipeline allows ",
              enc.max_threads_per_threadgroup());
}

void encode_dequantize(Encoder& enc, const QWeight& w, const at::Tensor& out) {
  const Params p = make_params(w, 0, false);
  const std::string name =
      kernel_name("quant", std::string("dequantize_") + format_token(w.format), out.scalar_type());
  enc.set_pipeline(name);
  require_threads(enc, name, kDequantThreads);
  bind_weight(enc, 0, w);
  enc.set_tensor(3, out);
  enc.set_value(4, p);
  enc.dispatch_threads({p.k / kRun, p.n, 1}, {kDequantThreads, 1, 1});
}

// out [m, cols] = a @ W^T (forward, cols = n) or a @ W (backward, cols = k); a, out contiguous.
void encode_product(Encoder& enc, const at::Tensor& a, const QWeight& w, const at::Tensor& bias,
                    const at::Tensor& out, bool backward) {
  const int64_t m = a.size(0);
  const Params p = make_params(w, m, bias.defined());
  const bool gemv = !backward && m <= kGemvMaxRows;
  const std::string variant = backward ? "bwd"
                              : gemv   ? std::string("gemv_") + format_token(w.format)
                                       : "gemm";
  const std::string name = kernel_name("quant", variant, a.scalar_type());
  enc.set_pipeline(name);
  enc.set_tensor(0, a);
  bind_weight(enc, 1, w);
  enc.set_tensor(4, bias.defined() ? bias : a);  // placeholder: the flag keeps it unread
  enc.set_tensor(5, out);
  enc.set_value(6, p);
  if (gemv) {
    const uint32_t threads = kGemvSimds * kSimdWidth;
    require_threads(enc, name, threads);
    enc.dispatch_threadgroups({ceil_div(p.n, kGemvSimds * kGemvRowsPerSimd), 1, 1},
                              {threads, 1, 1});
  } else {
    require_threads(enc, name, kTileThreads);
    const uint32_t cols = backward ? p.k : p.n;
    enc.dispatch_threadgroups({ceil_div(cols, kTile), ceil_div(p.m, kTile), 1},
                              {kTileThreads, 1, 1});
  }
}

// The Metal backend of the shared entry points (quant.h). The hooks run after the shared
// validation, so every input the CPU rejects gets the CPU's error first.
struct MetalKernels {
  using Guard = NoDeviceGuard;  // PyTorch's MPS backend has one device
  Encoder& enc;
  const char* op;
  // The primary tensor is the activation (linear), grad_out (backward) or the uint8 weight
  // (dequantize, whose output dtype the launch functions below check before allocating it).
  static void check(const char* op, const char* arg, const at::Tensor& t) {
    if (t.scalar_type() != at::kByte) check_metal_dtype(op, arg, t.scalar_type());
  }
  void dequantize(const QWeight& w, const at::Tensor& out) const {
    check_sizes(op, w, 0);
    encode_dequantize(enc, w, out);
  }
  void linear(const at::Tensor& x, const QWeight& w, const at::Tensor& bias,
              const at::Tensor& out) const {
    check_weight(w, x.size(0));
    encode_product(enc, x, w, bias, out, false);
  }
  void linear_backward(const at::Tensor& grad, const QWeight& w,
                       const at::Tensor& grad_input) const {
    check_weight(w, grad.size(0));
    encode_product(enc, grad, w, at::Tensor(), grad_input, true);
  }
  // The affine formats' scales and biases are read by the kernels in their own dtype, which
  // may differ from the activations': float64 ones are rejected like float64 activations.
  void check_weight(const QWeight& w, int64_t m) const {
    if (w.scales.defined()) check_metal_dtype(op, "scales", w.scales.scalar_type());
    check_sizes(op, w, m);
  }
};

template <int Bits>
struct AffineOps {
  static constexpr const char* kDeq = Bits == 4 ? "int4_dequantize" : "int8_dequantize";
  static constexpr const char* kLin = Bits == 4 ? "int4_linear" : "int8_linear";
  static constexpr const char* kBwd = Bits == 4 ? "int4_linear_backward" : "int8_linear_backward";

  static at::Tensor deq(Encoder& enc, const at::Tensor& q, const at::Tensor& s, const at::Tensor& z,
                        int64_t g) {
    const QWeight w = quant::check_affine(kDeq, Bits, q, s, z, g, "qweight", q);
    // The output takes the scales' dtype: check it before it is allocated.
    check_metal_dtype(kDeq, "scales", s.scalar_type());
    return quant::dequantize(MetalKernels{enc, kDeq}, kDeq, w, s.scalar_type(), "qweight", q);
  }
  static at::Tensor lin(Encoder& enc, const at::Tensor& x, const at::Tensor& q, const at::Tensor& s,
                        const at::Tensor& z, int64_t g, const std::optional<at::Tensor>& bias) {
    return quant::linear(MetalKernels{enc, kLin}, kLin, x,
                         quant::check_affine(kLin, Bits, q, s, z, g, "input", x), bias);
  }
  static at::Tensor bwd(Encoder& enc, const at::Tensor& grad, const at::Tensor& q,
                        const at::Tensor& s, const at::Tensor& z, int64_t g) {
    return quant::linear_backward(MetalKernels{enc, kBwd}, kBwd, grad,
                                  quant::check_affine(kBwd, Bits, q, s, z, g, "grad_out", grad));
  }
};

at::Tensor gguf_dequantize(Encoder& enc, const at::Tensor& data, int64_t qtype,
                           std::optional<at::ScalarType> dtype) {
  const char* op = "gguf_dequantize";
  const QWeight w = quant::check_gguf(op, data, qtype, "data", data);
  const at::ScalarType t = quant::gguf_dtype(op, dtype);
  check_metal_dtype(op, "dtype", t);
  return quant::dequantize(MetalKernels{enc, op}, op, w, t, "data", data);
}

at::Tensor gguf_linear(Encoder& enc, const at::Tensor& x, const at::Tensor& data, int64_t qtype,
                       const std::optional<at::Tensor>& bias) {
  const char* op = "gguf_linear";
  return quant::linear(MetalKernels{enc, op}, op, x, quant::check_gguf(op, data, qtype, "input", x),
                       bias);
}

at::Tensor gguf_linear_backward(Encoder& enc, const at::Tensor& grad, const at::Tensor& data,
                                int64_t qtype) {
  const char* op = "gguf_linear_backward";
  return quant::linear_backward(MetalKernels{enc, op}, op, grad,
                                quant::check_gguf(op, data, qtype, "grad_out", grad));
}

std::vector<std::string> quant_kernel_names() {
  std::vector<std::string> names;
  for (auto t : {at::kFloat, at::kHalf, at::kBFloat16}) {
    for (const char* v : kFormatVariants) {
      for (const char* f : kFormats)
        names.push_back(kernel_name("quant", std::string(v) + "_" + f, t));
    }
    for (const char* v : kTiledVariants) names.push_back(kernel_name("quant", v, t));
  }
  return names;
}

}  // namespace

METALCORE_METAL_IMPL(m) {
  m.impl("int4_dequantize", on_metal<&AffineOps<4>::deq>);
  m.impl("int4_linear", on_metal<&AffineOps<4>::lin>);
  m.impl("int4_linear_backward", on_metal<&AffineOps<4>::bwd>);
  m.impl("int8_dequantize", on_metal<&AffineOps<8>::deq>);
  m.impl("int8_linear", on_metal<&AffineOps<8>::lin>);
  m.impl("int8_linear_backward", on_metal<&AffineOps<8>::bwd>);
  m.impl("gguf_dequantize", on_metal<&gguf_dequantize>);
  m.impl("gguf_linear", on_metal<&gguf_linear>);
  m.impl("gguf_linear_backward", on_metal<&gguf_linear_backward>);
}

const RegisterKernelNames registered_names(&quant_kernel_names);

}  // namespace metalcore::launch
