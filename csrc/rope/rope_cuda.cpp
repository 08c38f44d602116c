// CUDA backend of the RoPE family: the shared entry points (rope.h) over the launcher of
// rope_cuda.cu. Host code, error messages included, stays out of the .cu file.
#include "rope/rope_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "rope/rope.h"

namespace metalcore {
namespace {

struct CudaKernels : NoBackendLimits {
  using Guard = c10::cuda::CUDAGuard;
  static void apply(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                    const at::Tensor& sin, bool interleaved, bool transpose, const rope::Dims& dm,
                    const at::Tensor& q_out, const at::Tensor& k_out) {
    cuda::launch_rope(transpose, q, k, cos, sin, interleaved, dm, q_out, k_out);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CUDA, m) { rope::register_impls<CudaKernels>(m); }

}  // namespace metalcore
