// Softmax launch layer: the Metal backend of the family's shared entry points (softmax.h).
// inner == 1 (softmax over the last dim, or a dim followed only by size-1 dims): one threadgroup
// per row ("rows"); otherwise one thread per (outer, inner) column ("columns").
#include <ATen/ATen.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "common/kernel_name.h"
#include "common/metal_registration.h"
#include "kernels/softmax.h"
#include "softmax/softmax.h"

namespace metalcore::launch {
namespace {

using namespace softmax_k;

constexpr const char* kVariants[] = {"rows", "columns", "bwd_rows", "bwd_columns"};

// Grids are 32-bit: rows (threadgroups) and columns (threads) must fit.
void check_metal(const char* op, const char* arg, const at::Tensor& t) {
  check_metal_dtype(op, arg, t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() <= std::numeric_limits<uint32_t>::max(), "metalcore.", op,
                    ": at most 2^32 - 1 elements on the Metal backend, got ", t.sizes());
}

// Binds ins then outs, the params, and dispatches the rows or columns variant.
void encode(Encoder& enc, const char* rows_variant, const char* columns_variant,
            std::initializer_list<at::Tensor> ins, const at::Tensor& out, bool log) {
  const at::Tensor& first = *ins.begin();
  Params p{};
  p.outer = static_cast<uint64_t>(first.size(0));
  p.n = static_cast<uint64_t>(first.size(1));
  p.inner = static_cast<uint64_t>(first.size(2));
  p.log = log ? 1u : 0u;
  const bool rows = p.inner == 1;
  enc.set_pipeline(
      kernel_name("softmax", rows ? rows_variant : columns_variant, first.scalar_type()));
  const uint32_t max_threads = enc.max_threads_per_threadgroup() / kSimdWidth * kSimdWidth;
  unsigned index = 0;
  for (const at::Tensor& t : ins) enc.set_tensor(index++, t);
  enc.set_tensor(index++, out);
  enc.set_value(index, p);
  if (rows) {
    // Enough simdgroups to cover the row once, capped by the pipeline and kRowThreads.
    const uint32_t want =
        round_up(static_cast<uint32_t>(std::min<uint64_t>(p.n, kRowThreads)), kSimdWidth);
    const uint32_t threads = std::max(kSimdWidth, std::min(want, max_threads));
    enc.dispatch_threadgroups({static_cast<uint32_t>(p.outer), 1, 1}, {threads, 1, 1});
  } else {
    const uint32_t cols = static_cast<uint32_t>(p.outer * p.inner);
    enc.dispatch_threads({cols, 1, 1}, {std::min(kColumnThreads, max_threads), 1, 1});
  }
}

// The Metal backend of the shared entry points (softmax.h).
struct MetalKernels {
  using Guard = NoDeviceGuard;  // PyTorch's MPS backend has one device
  Encoder& enc;
  static void check(const char* op, const char* arg, const at::Tensor& t) {
    check_metal(op, arg, t);
  }
  void forward(const at::Tensor& x, bool log, const at::Tensor& out) const {
    encode(enc, "rows", "columns", {x}, out, log);
  }
  void backward(const at::Tensor& g, const at::Tensor& y, bool log, const at::Tensor& dx) const {
    encode(enc, "bwd_rows", "bwd_columns", {g, y}, dx, log);
  }
};

at::Tensor softmax(Encoder& enc, const at::Tensor& input, int64_t dim) {
  return softmax::forward(MetalKernels{enc}, "softmax", false, input, dim);
}

at::Tensor log_softmax(Encoder& enc, const at::Tensor& input, int64_t dim) {
  return softmax::forward(MetalKernels{enc}, "log_softmax", true, input, dim);
}

at::Tensor softmax_backward(Encoder& enc, const at::Tensor& grad_out, const at::Tensor& output,
                            int64_t dim) {
  return softmax::backward(MetalKernels{enc}, "softmax_backward", false, grad_out, output, dim);
}

at::Tensor log_softmax_backward(Encoder& enc, const at::Tensor& grad_out, const at::Tensor& output,
                                int64_t dim) {
  return softmax::backward(MetalKernels{enc}, "log_softmax_backward", true, grad_out, output, dim);
}

std::vector<std::string> softmax_kernel_names() {
  std::vector<std::string> names;
  for (const char* v : kVariants) {
    for (auto t : {at::kFloat, at::kHalf, at::kBFloat16})
      names.push_back(kernel_name("softmax", v, t));
  }
  return names;
}

}  // namespace

METALCORE_METAL_IMPL(m) {
  m.impl("softmax", on_metal<&softmax>);
  m.impl("log_softmax", on_metal<&log_softmax>);
  m.impl("softmax_backward", on_metal<&softmax_backward>);
  m.impl("log_softmax_backward", on_metal<&log_softmax_backward>);
}

const RegisterKernelNames registered_names(&softmax_kernel_names);

}  // namespace metalcore::launch
