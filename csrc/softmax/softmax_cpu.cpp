// CPU backend of the softmax family: the shared entry points (softmax.h) over the CPU kernels.
#include <torch/library.h>

#include "softmax/softmax.h"
#include "softmax/softmax_cpu_kernel.h"

namespace metalcore {
namespace {

struct CpuKernels : NoBackendLimits {
  using Guard = NoDeviceGuard;
  static void forward(const at::Tensor& x, bool log, const at::Tensor& out) {
    METALCORE_CPU_DISPATCH(softmax_forward, x, log, out);
  }
  static void backward(const at::Tensor& grad_out, const at::Tensor& y, bool log,
                       const at::Tensor& grad_in) {
    METALCORE_CPU_DISPATCH(softmax_backward, grad_out, y, log, grad_in);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CPU, m) { softmax::register_impls<CpuKernels>(m); }

}  // namespace metalcore
