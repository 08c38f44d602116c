// CPU backend of the cross-entropy family: the shared entry points (cross_entropy.h) over the
// CPU kernels.
#include <torch/library.h>

#include "cross_entropy/cross_entropy.h"
#include "cross_entropy/cross_entropy_cpu_kernel.h"

namespace metalcore {
namespace {

struct CpuKernels : NoBackendLimits {
  using Guard = NoDeviceGuard;
  static void forward(const at::Tensor& x, const at::Tensor& target, int64_t ignore_index,
                      double smoothing, const at::Tensor& losses) {
    METALCORE_CPU_DISPATCH(cross_entropy_forward, x, target, ignore_index, smoothing, losses);
  }
  static void backward(const at::Tensor& scale, const at::Tensor& x, const at::Tensor& target,
                       int64_t ignore_index, double smoothing, const at::Tensor& grad_in) {
    METALCORE_CPU_DISPATCH(cross_entropy_backward, scale, x, target, ignore_index, smoothing,
                           grad_in);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CPU, m) { cross_entropy::register_impls<CpuKernels>(m); }

}  // namespace metalcore
