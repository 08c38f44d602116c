// CPU backend of the LoRA linear family: the shared entry points (lora.h), whose matrix products
// run on ATen's BLAS.
#include <torch/library.h>

#include "lora/lora.h"

namespace metalcore {
namespace {

struct CpuKernels : NoBackendLimits {
  using Guard = NoDeviceGuard;
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CPU, m) { lora::register_impls<CpuKernels>(m); }

}  // namespace metalcore
