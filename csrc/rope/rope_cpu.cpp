// CPU backend of the RoPE family: the shared entry points (rope.h) over the CPU kernel.
#include <torch/library.h>

#include "rope/rope.h"
#include "rope/rope_cpu_kernel.h"

namespace metalcore {
namespace {

struct CpuKernels : NoBackendLimits {
  using Guard = NoDeviceGuard;
  static void apply(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                    const at::Tensor& sin, bool interleaved, bool transpose, const rope::Dims&,
                    const at::Tensor& q_out, const at::Tensor& k_out) {
    METALCORE_CPU_DISPATCH(rope_apply, q, k, cos, sin, interleaved, transpose, q_out, k_out);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CPU, m) { rope::register_impls<CpuKernels>(m); }

}  // namespace metalcore
