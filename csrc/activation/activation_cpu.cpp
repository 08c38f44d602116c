// CPU backend of the activation family: the shared entry points (activation.h) over the CPU
// kernels.
#include <torch/library.h>

#include "activation/activation.h"
#include "activation/activation_cpu_kernel.h"

namespace metalcore {
namespace {

using T = at::Tensor;

struct CpuKernels : NoBackendLimits {
  using Guard = NoDeviceGuard;
  static void silu(const T& x, const T& out) { METALCORE_CPU_DISPATCH(silu_forward, x, out); }
  static void silu_backward(const T& g, const T& x, const T& gx) {
    METALCORE_CPU_DISPATCH(silu_backward, g, x, gx);
  }
  static void gelu(const T& x, bool tanh, const T& out) {
    METALCORE_CPU_DISPATCH(gelu_forward, x, tanh, out);
  }
  static void gelu_backward(const T& g, const T& x, bool tanh, const T& gx) {
    METALCORE_CPU_DISPATCH(gelu_backward, g, x, tanh, gx);
  }
  static void swiglu(const T& gate, const T& up, const T& out) {
    METALCORE_CPU_DISPATCH(swiglu_forward, gate, up, out);
  }
  static void swiglu_backward(const T& g, const T& gate, const T& up, const T& gg, const T& gu) {
    METALCORE_CPU_DISPATCH(swiglu_backward, g, gate, up, gg, gu);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CPU, m) { activation::register_impls<CpuKernels>(m); }

}  // namespace metalcore
