// RMSNorm launch layer: validation, output allocation, variant choice, grid sizes and argument
// binding, written once against Encoder. Variants: "single" keeps a row in registers (one read)
// when ceil(n / kReads) threads fit in one threadgroup, "looped" strides over longer rows; the
// "_vec4" forms load 4 elements per instruction when every row is 4-element aligned.
#include "rmsnorm/rmsnorm_launch.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <initializer_list>
#include <limits>

#include "common/kernel_name.h"
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

void check_metal(const char* op, const at::Tensor& input, int64_t n) {
  check_metal_dtype(op, "input", input.scalar_type());
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

}  // namespace

at::Tensor rmsnorm(Encoder& enc, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                   double eps) {
  const int64_t n = rmsnorm::check_inputs("rmsnorm", input, weight, eps);
  check_metal("rmsnorm", input, n);
  at::Tensor out = at::empty(input.sizes(), input.options());
  if (input.numel() == 0) return out;
  encode_forward(enc, rmsnorm::as_rows(input, n), at::Tensor(),
                 rmsnorm::weight_or_undefined(weight), eps, out.view({-1, n}), at::Tensor());
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_add_rmsnorm(Encoder& enc, const at::Tensor& input,
                                                     const at::Tensor& residual,
                                                     const std::optional<at::Tensor>& weight,
                                                     double eps) {
  const char* op = "fused_add_rmsnorm";
  const int64_t n = rmsnorm::check_inputs(op, input, weight, eps);
  check_metal(op, input, n);
  check_float(op, "residual", residual);
  check_same_device(op, "residual", residual, "input", input);
  check_same_dtype(op, "residual", residual, "input", input);
  check_same_shape(op, "residual", residual, "input", input);
  at::Tensor out = at::empty(input.sizes(), input.options());
  at::Tensor residual_out = at::empty(input.sizes(), input.options());
  if (input.numel() == 0) return {out, residual_out};
  encode_forward(enc, rmsnorm::as_rows(input, n), rmsnorm::as_rows(residual, n),
                 rmsnorm::weight_or_undefined(weight), eps, out.view({-1, n}),
                 residual_out.view({-1, n}));
  return {out, residual_out};
}

namespace {

std::tuple<at::Tensor, at::Tensor> backward(Encoder& enc, const char* op, const char* x_arg,
                                            const at::Tensor& grad_out, const at::Tensor& grad_res,
                                            const at::Tensor& x,
                                            const std::optional<at::Tensor>& weight, double eps) {
  const int64_t n = rmsnorm::check_inputs(op, x, weight, eps);
  check_metal(op, x, n);
  check_same_device(op, "grad_out", grad_out, x_arg, x);
  check_same_dtype(op, "grad_out", grad_out, x_arg, x);
  check_same_shape(op, "grad_out", grad_out, x_arg, x);
  if (grad_res.defined()) {
    check_same_device(op, "grad_residual_out", grad_res, x_arg, x);
    check_same_dtype(op, "grad_residual_out", grad_res, x_arg, x);
    check_same_shape(op, "grad_residual_out", grad_res, x_arg, x);
  }
  const at::Tensor w = rmsnorm::weight_or_undefined(weight);
  at::Tensor grad_input = at::empty(x.sizes(), x.options());
  at::Tensor grad_weight = at::empty({w.defined() ? n : 0}, x.options());
  if (x.numel() == 0) {
    grad_weight.zero_();
    return {grad_input, grad_weight};
  }
  encode_backward(enc, rmsnorm::as_rows(grad_out, n), rmsnorm::as_rows(x, n), w,
                  grad_res.defined() ? rmsnorm::as_rows(grad_res, n) : at::Tensor(), eps,
                  grad_input.view({-1, n}), grad_weight);
  return {grad_input, grad_weight};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rmsnorm_backward(Encoder& enc, const at::Tensor& grad_out,
                                                    const at::Tensor& input,
                                                    const std::optional<at::Tensor>& weight,
                                                    double eps) {
  return backward(enc, "rmsnorm_backward", "input", grad_out, at::Tensor(), input, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> fused_add_rmsnorm_backward(
    Encoder& enc, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& residual_out, const std::optional<at::Tensor>& weight, double eps) {
  const at::Tensor grad_res = grad_residual_out.has_value() ? *grad_residual_out : at::Tensor();
  return backward(enc, "fused_add_rmsnorm_backward", "residual_out", grad_out, grad_res,
                  residual_out, weight, eps);
}

std::vector<std::string> rmsnorm_kernel_names() {
  std::vector<std::string> names;
  for (const char* v : kVariants) {
    for (auto t : {at::kFloat, at::kHalf, at::kBFloat16})
      names.push_back(kernel_name("rmsnorm", v, t));
  }
  return names;
}

}  // namespace metalcore::launch
