// CUDA backend of the LoRA linear family: the shared entry points (lora.h), whose matrix products
// run on cuBLAS through ATen (no custom kernels). Not yet run on a GPU, so registered only
// with METALCORE_CUDA_UNVALIDATED=1 (UnvalidatedCudaLimits).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "lora/lora.h"

namespace metalcore {
namespace {

struct CudaKernels : UnvalidatedCudaLimits {
  using Guard = c10::cuda::CUDAGuard;
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CUDA, m) {
  if (CudaKernels::enabled()) lora::register_impls<CudaKernels>(m);
}

}  // namespace metalcore
