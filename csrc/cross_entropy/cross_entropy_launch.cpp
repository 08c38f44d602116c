// Cross-entropy launch layer: the Metal backend of the family's shared entry points
// (cross_entropy.h); one threadgroup per row of logits for both ops.
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "common/kernel_name.h"
#include "common/metal_registration.h"
#include "cross_entropy/cross_entropy.h"
#include "kernels/cross_entropy.h"

namespace metalcore::launch {
namespace {

using namespace cross_entropy_k;

void check_metal(const char* op, const char* arg, const at::Tensor& x) {
  check_metal_dtype(op, arg, x.scalar_type());
  TORCH_CHECK_VALUE(x.size(0) <= std::numeric_limits<uint32_t>::max() &&
                        x.size(1) <= std::numeric_limits<uint32_t>::max(),
                    "metalcore.", op, ": at most 2^32 - 1 rows of at most 2^32 - 1 classes, got ",
                    x.sizes());
}

Params params(const at::Tensor& x, int64_t ignore_index, double smoothing) {
  Params p{};
  p.x_stride = static_cast<uint64_t>(x.stride(0));
  p.ignore_index = static_cast<uint64_t>(ignore_index);
  p.n = static_cast<uint32_t>(x.size(1));
  p.smoothing = static_cast<float>(smoothing);
  return p;
}

// Enough simdgroups to cover a row once, capped by the pipeline and kRowThreads.
Dim3 row_threads(Encoder& enc, uint32_t n) {
  const uint32_t max_threads = enc.max_threads_per_threadgroup() / kSimdWidth * kSimdWidth;
  const uint32_t want = round_up(std::min(n, kRowThreads), kSimdWidth);
  return {std::max(kSimdWidth, std::min(want, max_threads)), 1, 1};
}

// The Metal backend of the shared entry points (cross_entropy.h).
struct MetalKernels {
  using Guard = NoDeviceGuard;  // PyTorch's MPS backend has one device
  Encoder& enc;
  static void check(const char* op, const char* arg, const at::Tensor& x) {
    check_metal(op, arg, x);
  }
  void forward(const at::Tensor& x, const at::Tensor& target, int64_t ignore_index,
               double smoothing, const at::Tensor& losses) const {
    const Params p = params(x, ignore_index, smoothing);
    enc.set_pipeline(kernel_name("cross_entropy", "fwd", x.scalar_type()));
    enc.set_tensor(0, x);
    enc.set_tensor(1, target);
    enc.set_tensor(2, losses);
    enc.set_value(3, p);
    enc.dispatch_threadgroups({static_cast<uint32_t>(x.size(0)), 1, 1}, row_threads(enc, p.n));
  }
  void backward(const at::Tensor& scale, const at::Tensor& x, const at::Tensor& target,
                int64_t ignore_index, double smoothing, const at::Tensor& grad_in) const {
    const Params p = params(x, ignore_index, smoothing);
    enc.set_pipeline(kernel_name("cross_entropy", "bwd", x.scalar_type()));
    enc.set_tensor(0, scale);
    enc.set_tensor(1, x);
    enc.set_tensor(2, target);
    enc.set_tensor(3, grad_in);
    enc.set_value(4, p);
    enc.dispatch_threadgroups({static_cast<uint32_t>(x.size(0)), 1, 1}, row_threads(enc, p.n));
  }
};

at::Tensor cross_entropy(Encoder& enc, const at::Tensor& input, const at::Tensor& target,
                         int64_t ignore_index, c10::string_view reduction, double label_smoothing) {
  return cross_entropy::forward(MetalKernels{enc}, input, target, ignore_index, reduction,
                                label_smoothing);
}

at::Tensor cross_entropy_backward(Encoder& enc, const at::Tensor& grad_loss,
                                  const at::Tensor& input, const at::Tensor& target,
                                  int64_t ignore_index, c10::string_view reduction,
                                  double label_smoothing) {
  return cross_entropy::backward(MetalKernels{enc}, grad_loss, input, target, ignore_index,
                                 reduction, label_smoothing);
}

std::vector<std::string> cross_entropy_kernel_names() {
  std::vector<std::string> names;
  for (const char* v : {"fwd", "bwd"}) {
    for (auto t : {at::kFloat, at::kHalf, at::kBFloat16})
      names.push_back(kernel_name("cross_entropy", v, t));
  }
  return names;
}

}  // namespace

METALCORE_METAL_IMPL(m) {
  m.impl("cross_entropy", on_metal<&cross_entropy>);
  m.impl("cross_entropy_backward", on_metal<&cross_entropy_backward>);
}

const RegisterKernelNames registered_names(&cross_entropy_kernel_names);

}  // namespace metalcore::launch
