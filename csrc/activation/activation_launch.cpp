// Activation launch layer: inputs are read through contiguous views (a copy only when needed),
// outputs are contiguous; one elementwise launch of ceil(numel / block) threadgroups per op.
#include "activation/activation_launch.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <initializer_list>
#include <limits>

#include "activation/activation.h"
#include "common/kernel_name.h"
#include "kernels/activation.h"

namespace metalcore::launch {
namespace {

using namespace activation_k;
using activation::check_like;

// Binds `ins` then `outs` at consecutive indices, then the params, and covers numel elements.
void encode(Encoder& enc, const char* op, const char* family, const char* variant,
            std::initializer_list<at::Tensor> ins, std::initializer_list<at::Tensor> outs) {
  const at::Tensor& first = *ins.begin();
  check_metal_dtype(op, std::string(family) == "swiglu" ? "gate" : "input", first.scalar_type());
  const int64_t numel = first.numel();
  if (numel == 0) return;
  enc.set_pipeline(kernel_name(family, variant, first.scalar_type()));
  const uint32_t threads =
      std::min(kThreads, enc.max_threads_per_threadgroup() / kSimdWidth * kSimdWidth);
  const int64_t block = static_cast<int64_t>(threads) * kIlp;
  const int64_t groups = (numel + block - 1) / block;
  TORCH_CHECK_VALUE(groups <= std::numeric_limits<uint32_t>::max(), "metalcore.", op,
                    ": too many elements for one launch (", numel, ")");
  unsigned index = 0;
  for (const at::Tensor& t : ins) enc.set_tensor(index++, t);
  for (const at::Tensor& t : outs) enc.set_tensor(index++, t);
  enc.set_value(index, Params{static_cast<uint64_t>(numel)});
  enc.dispatch_threadgroups({static_cast<uint32_t>(groups), 1, 1}, {threads, 1, 1});
}

at::Tensor new_like(const at::Tensor& t) { return at::empty(t.sizes(), t.options()); }

}  // namespace

at::Tensor silu(Encoder& enc, const at::Tensor& input) {
  check_float("silu", "input", input);
  at::Tensor out = new_like(input);
  encode(enc, "silu", "silu", "fwd", {input.contiguous()}, {out});
  return out;
}

at::Tensor silu_backward(Encoder& enc, const at::Tensor& grad_out, const at::Tensor& input) {
  check_float("silu_backward", "input", input);
  check_like("silu_backward", "grad_out", grad_out, "input", input);
  at::Tensor grad_input = new_like(input);
  encode(enc, "silu_backward", "silu", "bwd", {grad_out.contiguous(), input.contiguous()},
         {grad_input});
  return grad_input;
}

at::Tensor gelu(Encoder& enc, const at::Tensor& input, c10::string_view approximate) {
  check_float("gelu", "input", input);
  const bool tanh_approx = activation::parse_approximate("gelu", approximate);
  at::Tensor out = new_like(input);
  encode(enc, "gelu", "gelu", tanh_approx ? "tanh_fwd" : "erf_fwd", {input.contiguous()}, {out});
  return out;
}

at::Tensor gelu_backward(Encoder& enc, const at::Tensor& grad_out, const at::Tensor& input,
                         c10::string_view approximate) {
  check_float("gelu_backward", "input", input);
  check_like("gelu_backward", "grad_out", grad_out, "input", input);
  const bool tanh_approx = activation::parse_approximate("gelu_backward", approximate);
  at::Tensor grad_input = new_like(input);
  encode(enc, "gelu_backward", "gelu", tanh_approx ? "tanh_bwd" : "erf_bwd",
         {grad_out.contiguous(), input.contiguous()}, {grad_input});
  return grad_input;
}

at::Tensor swiglu(Encoder& enc, const at::Tensor& gate, const at::Tensor& up) {
  check_float("swiglu", "gate", gate);
  check_like("swiglu", "up", up, "gate", gate);
  at::Tensor out = new_like(gate);
  encode(enc, "swiglu", "swiglu", "fwd", {gate.contiguous(), up.contiguous()}, {out});
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(Encoder& enc, const at::Tensor& grad_out,
                                                   const at::Tensor& gate, const at::Tensor& up) {
  check_float("swiglu_backward", "gate", gate);
  check_like("swiglu_backward", "up", up, "gate", gate);
  check_like("swiglu_backward", "grad_out", grad_out, "gate", gate);
  at::Tensor grad_gate = new_like(gate), grad_up = new_like(up);
  encode(enc, "swiglu_backward", "swiglu", "bwd",
         {grad_out.contiguous(), gate.contiguous(), up.contiguous()}, {grad_gate, grad_up});
  return {grad_gate, grad_up};
}

std::vector<std::string> activation_kernel_names() {
  std::vector<std::string> names;
  const std::pair<const char*, const char*> kinds[] = {
      {"silu", "fwd"},      {"silu", "bwd"},      {"gelu", "erf_fwd"}, {"gelu", "erf_bwd"},
      {"gelu", "tanh_fwd"}, {"gelu", "tanh_bwd"}, {"swiglu", "fwd"},   {"swiglu", "bwd"}};
  for (const auto& [family, variant] : kinds) {
    for (auto t : {at::kFloat, at::kHalf, at::kBFloat16})
      names.push_back(kernel_name(family, variant, t));
  }
  return names;
}

}  // namespace metalcore::launch
