// CPU backend of the attention family: the shared entry points (attention.h) over the CPU
// kernels.
#include <torch/library.h>

#include "attention/attention.h"
#include "attention/attention_cpu_kernel.h"

namespace metalcore {
namespace {

struct CpuKernels : NoBackendLimits {
  using Guard = NoDeviceGuard;
  static void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& mask, const attention::Params& p, const at::Tensor& out,
                      const at::Tensor& lse) {
    METALCORE_CPU_DISPATCH(attention_forward, q, k, v, mask, p, out, lse);
  }
  static void backward(const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q,
                       const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                       const at::Tensor& lse, const at::Tensor& mask, const attention::Params& p,
                       const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
    METALCORE_CPU_DISPATCH(attention_backward, grad_out, grad_lse, q, k, v, out, lse, mask, p, dq,
                           dk, dv);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CPU, m) { attention::register_impls<CpuKernels>(m); }

}  // namespace metalcore
