// CUDA backend of the softmax family: the shared entry points (softmax.h) over the launchers of
// softmax_cuda.cu. The kernels compile in CI but have not run on a GPU yet, hence
// UnvalidatedCudaLimits (registered only with METALCORE_CUDA_UNVALIDATED=1).
#include "softmax/softmax_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "softmax/softmax.h"

namespace metalcore {
namespace {

struct CudaKernels : UnvalidatedCudaLimits {
  using Guard = c10::cuda::CUDAGuard;
  static constexpr auto forward = &cuda::launch_softmax_forward;
  static constexpr auto backward = &cuda::launch_softmax_backward;
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CUDA, m) {
  if (CudaKernels::enabled()) softmax::register_impls<CudaKernels>(m);
}

}  // namespace metalcore
