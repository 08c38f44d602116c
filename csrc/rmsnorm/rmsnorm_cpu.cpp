// CPU backend of the RMSNorm family: the shared entry points (rmsnorm.h) over the CPU kernels.
#include <torch/library.h>

#include "rmsnorm/rmsnorm.h"
#include "rmsnorm/rmsnorm_cpu_kernel.h"

namespace metalcore {
namespace {

struct CpuKernels : NoBackendLimits {
  using Guard = NoDeviceGuard;
  static void forward(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                      double eps, const at::Tensor& out, const at::Tensor& residual_out) {
    METALCORE_CPU_DISPATCH(rmsnorm_forward, x, residual, weight, eps, out, residual_out);
  }
  static void backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& grad_residual, double eps, const at::Tensor& grad_input,
                       const at::Tensor& grad_weight) {
    METALCORE_CPU_DISPATCH(rmsnorm_backward, grad_out, x, weight, grad_residual, eps, grad_input,
                           grad_weight);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CPU, m) { rmsnorm::register_impls<CpuKernels>(m); }

}  // namespace metalcore
