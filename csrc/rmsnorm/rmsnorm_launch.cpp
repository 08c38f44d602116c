// RMSNorm launch layer: the Metal backend of the family's shared entry points (rmsnorm.h) —
// Metal's limits, variant choice, grid sizes and argument binding, written once against Encoder.
// Each launch function is its op's kernel plus the Encoder that records the dispatches
// (common/metal_registration.h). Variants: "single" keeps a row in registers (one read) when
// ceil(n / kReads) threads fit in one threadgroup, "looped" strides over longer rows; the
// "_vec4" forms load 4 elements per instruction when every row is 4-element aligned.
#include <ATen/ATen.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/kernel_name.h"
#include "common/metal_registration.h"
#include "kernels/rmsnorm.h"
#include "rmsnorm/rmsnorm.h"

namespace metalcore::launch {
namespace {

using namespace rmsnorm_k;

constexpr const char* kVariants[] = {"single",      "single_vec4",     "looped",
                                     "looped_vec4", "bwd_single",      "bwd_single_vec4",
                                     "bwd_looped",  "bwd_looped_vec4", "dw_reduce"};

// vec4 loads need n % 4 == 0 and every row of every bound tensor starting 4-element aligned
// (storage bases are at least 16-byte aligned on both backends).
bool vec4_ok(uint32_t n, std::initializer_list<at::Tensor> tensors) {
  if (n % 4 != 0) return false;
  for (const at::Tensor& t : tensors) {
    if (!t.defined()) continue;
    if (Encoder::byte_offset(t) % (4 * t.element_size()) != 0) return false;
    if (t.dim() == 2 && t.size(0) > 1 && t.stride(0) % 4 != 0) return false;
  }
  return true;
}

std::string with_width(const char* variant, bool vec4) {
  return vec4 ? std::string(variant) + "_vec4" : std::string(variant);
}

void check_metal(const char* op, const char* arg, const at::Tensor& input, int64_t n) {
  check_metal_dtype(op, arg, input.scalar_type());
  TORCH_CHECK_VALUE(
      n <= std::numeric_limits<uint32_t>::max() &&
          input.numel() / std::max<int64_t>(n, 1) <= std::numeric_limits<uint32_t>::max(),
      "metalcore.", op, ": at most 2^32 - 1 rows of at most 2^32 - 1 elements, got ",
      input.sizes());
}

// The register-resident variant's threadgroup size, or 0 when the row does not fit in one.
uint32_t single_threads(Encoder& enc, const std::string& single_name, uint32_t n) {
  enc.set_pipeline(single_name);
  const uint32_t t = round_up(ceil_div(n, kReads), kSimdWidth);
  return t <= enc.max_threads_per_threadgroup() ? t : 0;
}

uint32_t looped_threads(Encoder& enc) {
  return std::max(kSimdWidth, enc.max_threads_per_threadgroup() / kSimdWidth * kSimdWidth);
}

// x, residual: [rows, n] with unit stride on n; out, residual_out: contiguous. Undefined optional
// tensors are replaced by a bound placeholder the kernel never touches (flags say so).
void encode_forward(Encoder& enc, const at::Tensor& x, const at::Tensor& residual,
                    const at::Tensor& weight, double eps, const at::Tensor& out,
                    const at::Tensor& residual_out) {
  const auto dtype = x.scalar_type();
  Params p{};
  p.rows = static_cast<uint32_t>(x.size(0));
  p.n = static_cast<uint32_t>(x.size(1));
  p.x_stride = static_cast<uint64_t>(x.stride(0));
  p.r_stride = residual.defined() ? static_cast<uint64_t>(residual.stride(0)) : 0;
  p.flags = (weight.defined() ? kHasWeight : 0u) | (residual.defined() ? kHasResidual : 0u);
  p.eps = static_cast<float>(eps);

  const bool vec4 = vec4_ok(p.n, {x, residual, weight, out, residual_out});
  uint32_t threads =
      single_threads(enc, kernel_name("rmsnorm", with_width("single", vec4), dtype), p.n);
  if (threads == 0) {
    enc.set_pipeline(kernel_name("rmsnorm", with_width("looped", vec4), dtype));
    threads = looped_threads(enc);
  }
  enc.set_tensor(0, x);
  enc.set_tensor(1, residual.defined() ? residual : x);
  enc.set_tensor(2, weight.defined() ? weight : x);
  enc.set_tensor(3, out);
  enc.set_tensor(4, residual_out.defined() ? residual_out : out);
  enc.set_value(5, p);
  enc.dispatch_threadgroups({p.rows, 1, 1}, {threads, 1, 1});
}

// Backward: grad_out, x, grad_residual: [rows, n] with unit stride on n; grad_input contiguous.
// dweight comes from per-threadgroup partials [groups, n] (float) summed by dw_reduce.
void encode_backward(Encoder& enc, const at::Tensor& grad_out, const at::Tensor& x,
                     const at::Tensor& weight, const at::Tensor& grad_residual, double eps,
                     const at::Tensor& grad_input, const at::Tensor& grad_weight) {
  const auto dtype = x.scalar_type();
  Params p{};
  p.rows = static_cast<uint32_t>(x.size(0));
  p.n = static_cast<uint32_t>(x.size(1));
  p.x_stride = static_cast<uint64_t>(x.stride(0));
  p.g_stride = static_cast<uint64_t>(grad_out.stride(0));
  p.r_stride = grad_residual.defined() ? static_cast<uint64_t>(grad_residual.stride(0)) : 0;
  p.flags = (weight.defined() ? kHasWeight : 0u) | (grad_residual.defined() ? kHasResidual : 0u);
  p.eps = static_cast<float>(eps);
  uint32_t groups = std::min(kBackwardMaxGroups, ceil_div(p.rows, kBackwardMinRowsPerGroup));
  p.rows_per_group = ceil_div(p.rows, groups);
  groups = ceil_div(p.rows, p.rows_per_group);

  const at::Tensor partial =
      weight.defined() ? at::empty({groups, p.n}, x.options().dtype(at::kFloat)) : at::Tensor();
  const bool vec4 = vec4_ok(p.n, {grad_out, x, weight, grad_residual, grad_input, partial});
  uint32_t threads =
      single_threads(enc, kernel_name("rmsnorm", with_width("bwd_single", vec4), dtype), p.n);
  if (threads == 0) {
    enc.set_pipeline(kernel_name("rmsnorm", with_width("bwd_looped", vec4), dtype));
    threads = looped_threads(enc);
  }
  enc.set_tensor(0, grad_out);
  enc.set_tensor(1, x);
  enc.set_tensor(2, weight.defined() ? weight : x);
  enc.set_tensor(3, grad_residual.defined() ? grad_residual : x);
  enc.set_tensor(4, grad_input);
  enc.set_tensor(5, partial.defined() ? partial : grad_input);
  enc.set_value(6, p);
  enc.dispatch_threadgroups({groups, 1, 1}, {threads, 1, 1});

  if (!weight.defined()) return;
  enc.set_pipeline(kernel_name("rmsnorm", "dw_reduce", dtype));
  enc.set_tensor(0, partial);
  enc.set_tensor(1, grad_weight);
  enc.set_value(2, p.n);
  enc.set_value(3, groups);
  const uint32_t t = std::min<uint32_t>(256, round_up(p.n, kSimdWidth));
  enc.dispatch_threads({p.n, 1, 1}, {std::min(t, looped_threads(enc)), 1, 1});
}

// The Metal backend of the shared entry points (rmsnorm.h).
struct MetalKernels {
  using Guard = NoDeviceGuard;  // PyTorch's MPS backend has one device
  Encoder& enc;
  static void check(const char* op, const char* arg, const at::Tensor& x) {
    check_metal(op, arg, x, x.size(-1));
  }
  void forward(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
               double eps, const at::Tensor& out, const at::Tensor& residual_out) const {
    encode_forward(enc, x, residual, weight, eps, out, residual_out);
  }
  void backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                const at::Tensor& grad_residual, double eps, const at::Tensor& grad_input,
                const at::Tensor& grad_weight) const {
    encode_backward(enc, grad_out, x, weight, grad_residual, eps, grad_input, grad_weight);
  }
};

at::Tensor rmsnorm(Encoder& enc, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                   double eps) {
  return rmsnorm::forward(MetalKernels{enc}, input, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> fused_add_rmsnorm(Encoder& enc, const at::Tensor& input,
                                                     const at::Tensor& residual,
                                                     const std::optional<at::Tensor>& weight,
                                                     double eps) {
  return rmsnorm::fused_add_forward(MetalKernels{enc}, input, residual, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> rmsnorm_backward(Encoder& enc, const at::Tensor& grad_out,
                                                    const at::Tensor& input,
                                                    const std::optional<at::Tensor>& weight,
                                                    double eps) {
  return rmsnorm::rmsnorm_backward(MetalKernels{enc}, grad_out, input, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> fused_add_rmsnorm_backward(
    Encoder& enc, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& residual_out, const std::optional<at::Tensor>& weight, double eps) {
  return rmsnorm::fused_add_backward(MetalKernels{enc}, grad_out, grad_residual_out, residual_out,
                                     weight, eps);
}

std::vector<std::string> rmsnorm_kernel_names() {
  std::vector<std::string> names;
  for (const char* v : kVariants) {
    for (auto t : {at::kFloat, at::kHalf, at::kBFloat16})
      names.push_back(kernel_name("rmsnorm", v, t));
  }
  return names;
}

}  // namespace

METALCORE_METAL_IMPL(m) {
  m.impl("rmsnorm", on_metal<&rmsnorm>);
  m.impl("rmsnorm_backward", on_metal<&rmsnorm_backward>);
  m.impl("fused_add_rmsnorm", on_metal<&fused_add_rmsnorm>);
  m.impl("fused_add_rmsnorm_backward", on_metal<&fused_add_rmsnorm_backward>);
}

const RegisterKernelNames registered_names(&rmsnorm_kernel_names);

}  // namespace metalcore::launch
