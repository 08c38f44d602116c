// LayerNorm launch layer: the Metal backend of the family's shared entry points (layer_norm.h) —
// Metal's limits, grid sizes and argument binding, written once against Encoder. One forward
// kernel (a threadgroup per row), one backward kernel (a threadgroup per block of rows, with
// float partials of dweight and dbias per threadgroup) and a column reduction of the partials.
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/kernel_name.h"
#include "common/metal_registration.h"
#include "kernels/layer_norm.h"
#include "layer_norm/layer_norm.h"

namespace metalcore::launch {
namespace {

using namespace layer_norm_k;

constexpr const char* kVariants[] = {"fwd", "bwd", "param_reduce"};

void check_metal(const char* op, const char* arg, const at::Tensor& input, int64_t n) {
  check_metal_dtype(op, arg, input.scalar_type());
  TORCH_CHECK_VALUE(
      n <= std::numeric_limits<uint32_t>::max() &&
          input.numel() / std::max<int64_t>(n, 1) <= std::numeric_limits<uint32_t>::max(),
      "metalcore.", op, ": at most 2^32 - 1 rows of at most 2^32 - 1 elements, got ",
      input.sizes());
}

// A whole number of simdgroups, no more than the row needs and the pipeline allows.
uint32_t row_threads(Encoder& enc, uint32_t n) {
  const uint32_t most =
      std::max(kSimdWidth, enc.max_threads_per_threadgroup() / kSimdWidth * kSimdWidth);
  return std::min(most, round_up(std::max(n, 1u), kSimdWidth));
}

// x, residual: [rows, n] with unit stride on n; out, residual_out: contiguous. Undefined optional
// tensors are replaced by a bound placeholder the kernel never touches (flags say so).
void encode_forward(Encoder& enc, const at::Tensor& x, const at::Tensor& residual,
                    const at::Tensor& weight, const at::Tensor& bias, double eps,
                    const at::Tensor& out, const at::Tensor& residual_out) {
  Params p{};
  p.rows = static_cast<uint32_t>(x.size(0));
  p.n = static_cast<uint32_t>(x.size(1));
  p.x_stride = static_cast<uint64_t>(x.stride(0));
  p.r_stride = residual.defined() ? static_cast<uint64_t>(residual.stride(0)) : 0;
  p.flags = (weight.defined() ? kHasWeight : 0u) | (residual.defined() ? kHasResidual : 0u) |
            (bias.defined() ? kHasBias : 0u);
  p.eps = static_cast<float>(eps);
  enc.set_pipeline(kernel_name("layer_norm", "fwd", x.scalar_type()));
  const uint32_t threads = row_threads(enc, p.n);
  enc.set_tensor(0, x);
  enc.set_tensor(1, residual.defined() ? residual : x);
  enc.set_tensor(2, weight.defined() ? weight : x);
  enc.set_tensor(3, bias.defined() ? bias : x);
  enc.set_tensor(4, out);
  enc.set_tensor(5, residual_out.defined() ? residual_out : out);
  enc.set_value(6, p);
  enc.dispatch_threadgroups({p.rows, 1, 1}, {threads, 1, 1});
}

void encode_param_reduce(Encoder& enc, const at::Tensor& partial, const at::Tensor& result,
                         uint32_t n, uint32_t groups) {
  enc.set_pipeline(kernel_name("layer_norm", "param_reduce", result.scalar_type()));
  enc.set_tensor(0, partial);
  enc.set_tensor(1, result);
  enc.set_value(2, n);
  enc.set_value(3, groups);
  const uint32_t t = std::min<uint32_t>(256, round_up(n, kSimdWidth));
  enc.dispatch_threads({n, 1, 1}, {std::min(t, row_threads(enc, t)), 1, 1});
}

// Backward: grad_out, x, grad_residual: [rows, n] with unit stride on n; grad_input contiguous.
void encode_backward(Encoder& enc, const at::Tensor& grad_out, const at::Tensor& x,
                     const at::Tensor& weight, const at::Tensor& grad_residual, double eps,
                     const at::Tensor& grad_input, const at::Tensor& grad_weight,
                     const at::Tensor& grad_bias) {
  Params p{};
  p.rows = static_cast<uint32_t>(x.size(0));
  p.n = static_cast<uint32_t>(x.size(1));
  p.x_stride = static_cast<uint64_t>(x.stride(0));
  p.g_stride = static_cast<uint64_t>(grad_out.stride(0));
  p.r_stride = grad_residual.defined() ? static_cast<uint64_t>(grad_residual.stride(0)) : 0;
  p.flags = (weight.defined() ? kHasWeight : 0u) | (grad_residual.defined() ? kHasResidual : 0u) |
            (grad_bias.defined() ? kHasBias : 0u);
  p.eps = static_cast<float>(eps);
  uint32_t groups = std::min(kBackwardMaxGroups, ceil_div(p.rows, kBackwardMinRowsPerGroup));
  p.rows_per_group = ceil_div(p.rows, groups);
  groups = ceil_div(p.rows, p.rows_per_group);

  const auto fopts = x.options().dtype(at::kFloat);
  const at::Tensor dw_partial =
      grad_weight.defined() ? at::empty({groups, p.n}, fopts) : at::Tensor();
  const at::Tensor db_partial =
      grad_bias.defined() ? at::empty({groups, p.n}, fopts) : at::Tensor();
  enc.set_pipeline(kernel_name("layer_norm", "bwd", x.scalar_type()));
  const uint32_t threads = row_threads(enc, p.n);
  enc.set_tensor(0, grad_out);
  enc.set_tensor(1, x);
  enc.set_tensor(2, weight.defined() ? weight : x);
  enc.set_tensor(3, grad_residual.defined() ? grad_residual : x);
  enc.set_tensor(4, grad_input);
  // Placeholders for absent partials: a float buffer the flags keep the kernel from touching.
  const at::Tensor any_partial = dw_partial.defined() ? dw_partial : db_partial;
  const at::Tensor placeholder = any_partial.defined() ? any_partial : at::empty({1}, fopts);
  enc.set_tensor(5, dw_partial.defined() ? dw_partial : placeholder);
  enc.set_tensor(6, db_partial.defined() ? db_partial : placeholder);
  enc.set_value(7, p);
  enc.dispatch_threadgroups({groups, 1, 1}, {threads, 1, 1});
  if (dw_partial.defined()) encode_param_reduce(enc, dw_partial, grad_weight, p.n, groups);
  if (db_partial.defined()) encode_param_reduce(enc, db_partial, grad_bias, p.n, groups);
}

// The Metal backend of the shared entry points (layer_norm.h).
struct MetalKernels {
  using Guard = NoDeviceGuard;  // PyTorch's MPS backend has one device
  Encoder& enc;
  static void check(const char* op, const char* arg, const at::Tensor& x) {
    check_metal(op, arg, x, x.size(-1));
  }
  void forward(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
               const at::Tensor& bias, double eps, const at::Tensor& out,
               const at::Tensor& residual_out) const {
    encode_forward(enc, x, residual, weight, bias, eps, out, residual_out);
  }
  void backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                const at::Tensor& grad_residual, double eps, const at::Tensor& grad_input,
                const at::Tensor& grad_weight, const at::Tensor& grad_bias) const {
    encode_backward(enc, grad_out, x, weight, grad_residual, eps, grad_input, grad_weight,
                    grad_bias);
  }
};

using OptT = std::optional<at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

at::Tensor layer_norm(Encoder& enc, const at::Tensor& input, const OptT& weight, const OptT& bias,
                      double eps) {
  return layer_norm::forward(MetalKernels{enc}, input, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor> fused_add_layer_norm(Encoder& enc, const at::Tensor& input,
                                                        const at::Tensor& residual,
                                                        const OptT& weight, const OptT& bias,
                                                        double eps) {
  return layer_norm::fused_add_forward(MetalKernels{enc}, input, residual, weight, bias, eps);
}

Grads layer_norm_backward(Encoder& enc, const at::Tensor& grad_out, const at::Tensor& input,
                          const OptT& weight, const OptT& bias, double eps) {
  return layer_norm::layer_norm_backward(MetalKernels{enc}, grad_out, input, weight, bias, eps);
}

Grads fused_add_layer_norm_backward(Encoder& enc, const at::Tensor& grad_out,
                                    const OptT& grad_residual_out, const at::Tensor& residual_out,
                                    const OptT& weight, const OptT& bias, double eps) {
  return layer_norm::fused_add_backward(MetalKernels{enc}, grad_out, grad_residual_out,
                                        residual_out, weight, bias, eps);
}

std::vector<std::string> layer_norm_kernel_names() {
  std::vector<std::string> names;
  for (const char* v : kVariants) {
    for (auto t : {at::kFloat, at::kHalf, at::kBFloat16})
      names.push_back(kernel_name("layer_norm", v, t));
  }
  return names;
}

}  // namespace

METALCORE_METAL_IMPL(m) {
  m.impl("layer_norm", on_metal<&layer_norm>);
  m.impl("layer_norm_backward", on_metal<&layer_norm_backward>);
  m.impl("fused_add_layer_norm", on_metal<&fused_add_layer_norm>);
  m.impl("fused_add_layer_norm_backward", on_metal<&fused_add_layer_norm_backward>);
}

const RegisterKernelNames registered_names(&layer_norm_kernel_names);

}  // namespace metalcore::launch
