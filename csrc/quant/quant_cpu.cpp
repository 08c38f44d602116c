// CPU backend of the weight-only quantization family: the shared entry points (quant.h) over
// the CPU kernels.
#include <torch/library.h>

#include "quant/quant.h"
#include "quant/quant_cpu_kernel.h"

namespace metalcore {
namespace {

struct CpuKernels : NoBackendLimits {
  using Guard = NoDeviceGuard;
  static void dequantize(const quant::QWeight& w, const at::Tensor& out) {
    METALCORE_CPU_DISPATCH(quant_dequantize, w, out);
  }
  static void linear(const at::Tensor& x, const quant::QWeight& w, const at::Tensor& bias,
                     const at::Tensor& out) {
    METALCORE_CPU_DISPATCH(quant_linear, x, w, bias, out);
  }
  static void linear_backward(const at::Tensor& grad, const quant::QWeight& w,
                              const at::Tensor& grad_input) {
    METALCORE_CPU_DISPATCH(quant_linear_backward, grad, w, grad_input);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CPU, m) { quant::register_impls<CpuKernels>(m); }

}  // namespace metalcore
