// CPU backend of the embedding_bag family: the shared entry points (embedding_bag.h) over the
// CPU kernels.
#include <torch/library.h>

#include "embedding_bag/embedding_bag.h"
#include "embedding_bag/embedding_bag_cpu_kernel.h"

namespace metalcore {
namespace {

using embedding_bag::Mode;

struct CpuKernels : NoBackendLimits {
  using Guard = NoDeviceGuard;
  static void forward(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& bounds,
                      Mode mode, const at::Tensor& psw, int64_t padding_idx,
                      const at::Tensor& out) {
    METALCORE_CPU_DISPATCH(embedding_bag_forward, weight, indices, bounds,
                           static_cast<int64_t>(mode), psw, padding_idx, out);
  }
  static void backward(const at::Tensor& grad_out, const at::Tensor& weight,
                       const at::Tensor& indices, const at::Tensor& bounds, Mode mode,
                       const at::Tensor& psw, int64_t padding_idx, const at::Tensor& grad_weight,
                       const at::Tensor& grad_psw) {
    METALCORE_CPU_DISPATCH(embedding_bag_backward, grad_out, weight, indices, bounds,
                           static_cast<int64_t>(mode), psw, padding_idx, grad_weight, grad_psw);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CPU, m) { embedding_bag::register_impls<CpuKernels>(m); }

}  // namespace metalcore
