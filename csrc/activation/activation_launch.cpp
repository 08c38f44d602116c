// Activation launch layer: the Metal backend of the family's shared entry points (activation.h);
// one elementwise launch of ceil(numel / block) threadgroups per op. Each launch function is its
// op's kernel plus the Encoder that records the dispatches (common/metal_registration.h).
#include <ATen/ATen.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "activation/activation.h"
#include "common/kernel_name.h"
#include "common/metal_registration.h"
#include "kernels/activation.h"

namespace metalcore::launch {
namespace {

using namespace activation_k;

// Binds `ins` then `outs` at consecutive indices, then the params, and covers numel elements.
void encode(Encoder& enc, const char* op, const char* family, const char* variant,
            std::initializer_list<at::Tensor> ins, std::initializer_list<at::Tensor> outs) {
  const at::Tensor& first = *ins.begin();
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

// The Metal backend of the shared entry points (activation.h).
struct MetalKernels {
  using Guard = NoDeviceGuard;  // PyTorch's MPS backend has one device
  Encoder& enc;
  static void check(const char* op, const char* arg, const at::Tensor& x) {
    check_metal_dtype(op, arg, x.scalar_type());
  }
  void silu(const at::Tensor& x, const at::Tensor& out) const {
    encode(enc, "silu", "silu", "fwd", {x}, {out});
  }
  void silu_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& gx) const {
    encode(enc, "silu_backward", "silu", "bwd", {g, x}, {gx});
  }
  void gelu(const at::Tensor& x, bool tanh, const at::Tensor& out) const {
    encode(enc, "gelu", "gelu", tanh ? "tanh_fwd" : "erf_fwd", {x}, {out});
  }
  void gelu_backward(const at::Tensor& g, const at::Tensor& x, bool tanh,
                     const at::Tensor& gx) const {
    encode(enc, "gelu_backward", "gelu", tanh ? "tanh_bwd" : "erf_bwd", {g, x}, {gx});
  }
  void swiglu(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) const {
    encode(enc, "swiglu", "swiglu", "fwd", {gate, up}, {out});
  }
  void swiglu_backward(const at::Tensor& g, const at::Tensor& gate, const at::Tensor& up,
                       const at::Tensor& gg, const at::Tensor& gu) const {
    encode(enc, "swiglu_backward", "swiglu", "bwd", {g, gate, up}, {gg, gu});
  }
};

at::Tensor silu(Encoder& enc, const at::Tensor& input) {
  return activation::silu(MetalKernels{enc}, input);
}

at::Tensor silu_backward(Encoder& enc, const at::Tensor& grad_out, const at::Tensor& input) {
  return activation::silu_backward(MetalKernels{enc}, grad_out, input);
}

at::Tensor gelu(Encoder& enc, const at::Tensor& input, c10::string_view approximate) {
  return activation::gelu(MetalKernels{enc}, input, approximate);
}

at::Tensor gelu_backward(Encoder& enc, const at::Tensor& grad_out, const at::Tensor& input,
                         c10::string_view approximate) {
  return activation::gelu_backward(MetalKernels{enc}, grad_out, input, approximate);
}

at::Tensor swiglu(Encoder& enc, const at::Tensor& gate, const at::Tensor& up) {
  return activation::swiglu(MetalKernels{enc}, gate, up);
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(Encoder& enc, const at::Tensor& grad_out,
                                                   const at::Tensor& gate, const at::Tensor& up) {
  return activation::swiglu_backward(MetalKernels{enc}, grad_out, gate, up);
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

}  // namespace

METALCORE_METAL_IMPL(m) {
  m.impl("silu", on_metal<&silu>);
  m.impl("silu_backward", on_metal<&silu_backward>);
  m.impl("gelu", on_metal<&gelu>);
  m.impl("gelu_backward", on_metal<&gelu_backward>);
  m.impl("swiglu", on_metal<&swiglu>);
  m.impl("swiglu_backward", on_metal<&swiglu_backward>);
}

const RegisterKernelNames registered_names(&activation_kernel_names);

}  // namespace metalcore::launch
