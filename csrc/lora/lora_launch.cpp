// Metal backend of the LoRA linear family: the shared entry points (lora.h) with their matrix
// products on the device's own GEMM, as the CPU and CUDA backends use BLAS and cuBLAS. On macOS
// that is PyTorch's MPS matmul (Apple's tuned kernels, which a metalcore GEMM would not beat);
// what the op adds is in the composition: never forming scaling * B @ A, and one graph node each
// way. In the msim test library the same code runs on CPU tensors, which tests this backend's
// registration and limits (float64 is refused, as Metal has no double), not a Metal kernel.
#include <ATen/ATen.h>

#include "common/backend.h"
#include "common/kernel_name.h"
#include "common/metal_registration.h"
#include "lora/lora.h"

namespace metalcore::launch {
namespace {

struct MetalKernels {
  using Guard = NoDeviceGuard;  // MPS has one device, and PyTorch's ops take its stream
  static void check(const char* op, const char* arg, const at::Tensor& t) {
    check_metal_dtype(op, arg, t.scalar_type());
  }
};

}  // namespace

METALCORE_METAL_IMPL(m) { lora::register_impls<MetalKernels>(m); }

}  // namespace metalcore::launch
