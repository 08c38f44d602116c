// CUDA backend of the cross-entropy family: the shared entry points (cross_entropy.h) over the
// launchers of cross_entropy_cuda.cu. The kernels compile in CI but have not run on a GPU yet,
// hence UnvalidatedCudaLimits (registered only with METALCORE_CUDA_UNVALIDATED=1).
#include "cross_entropy/cross_entropy_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cross_entropy/cross_entropy.h"

namespace metalcore {
namespace {

struct CudaKernels : UnvalidatedCudaLimits {
  using Guard = c10::cuda::CUDAGuard;
  static constexpr auto forward = &cuda::launch_cross_entropy_forward;
  static constexpr auto backward = &cuda::launch_cross_entropy_backward;
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CUDA, m) {
  if (CudaKernels::enabled()) cross_entropy::register_impls<CudaKernels>(m);
}

}  // namespace metalcore
