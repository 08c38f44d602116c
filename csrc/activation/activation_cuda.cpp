// CUDA backend of the activation family: the shared entry points (activation.h) over the
// launchers of activation_cuda.cu. Host code, error messages included, stays out of the .cu file.
#include "activation/activation_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "activation/activation.h"

namespace metalcore {
namespace {

struct CudaKernels : NoBackendLimits {
  using Guard = c10::cuda::CUDAGuard;
  static constexpr auto silu = &cuda::launch_silu;
  static constexpr auto silu_backward = &cuda::launch_silu_backward;
  static constexpr auto gelu = &cuda::launch_gelu;
  static constexpr auto gelu_backward = &cuda::launch_gelu_backward;
  static constexpr auto swiglu = &cuda::launch_swiglu;
  static constexpr auto swiglu_backward = &cuda::launch_swiglu_backward;
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CUDA, m) { activation::register_impls<CudaKernels>(m); }

}  // namespace metalcore
