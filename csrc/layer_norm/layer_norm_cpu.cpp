// CPU backend of the LayerNorm family: the shared entry points (layer_norm.h) over the CPU
// kernels.
#include <torch/library.h>

#include "layer_norm/layer_norm.h"
#include "layer_norm/layer_norm_cpu_kernel.h"

namespace metalcore {
namespace {

struct CpuKernels : NoBackendLimits {
  using Guard = NoDeviceGuard;
  static void forward(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                      const at::Tensor& bias, double eps, const at::Tensor& out,
                      const at::Tensor& residual_out) {
    METALCORE_CPU_DISPATCH(layer_norm_forward, x, residual, weight, bias, eps, out, residual_out);
  }
  static void backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& grad_residual, double eps, const at::Tensor& grad_input,
                       const at::Tensor& grad_weight, const at::Tensor& grad_bias) {
    METALCORE_CPU_DISPATCH(layer_norm_backward, grad_out, x, weight, grad_residual, eps, grad_input,
                           grad_weight, grad_bias);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CPU, m) { layer_norm::register_impls<CpuKernels>(m); }

}  // namespace metalcore
