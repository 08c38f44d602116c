// CUDA backend of the embedding_bag family: the shared entry points (embedding_bag.h) over the
// launchers of embedding_bag_cuda.cu. The kernels compile in CI but have not run on a GPU:
// registered only with METALCORE_CUDA_UNVALIDATED=1 (UnvalidatedCudaLimits).
#include "embedding_bag/embedding_bag_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "embedding_bag/embedding_bag.h"

namespace metalcore {
namespace {

using embedding_bag::Mode;

struct CudaKernels : UnvalidatedCudaLimits {
  using Guard = c10::cuda::CUDAGuard;
  static void forward(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& bounds,
                      Mode mode, const at::Tensor& psw, int64_t padding_idx,
                      const at::Tensor& out) {
    cuda::launch_embedding_bag_forward(weight, indices, bounds, static_cast<int64_t>(mode), psw,
                                       padding_idx, out);
  }
  static void backward(const at::Tensor& grad_out, const at::Tensor& weight,
                       const at::Tensor& indices, const at::Tensor& bounds, Mode mode,
                       const at::Tensor& psw, int64_t padding_idx, const at::Tensor& grad_weight,
                       const at::Tensor& grad_psw) {
    cuda::launch_embedding_bag_backward(grad_out, weight, indices, bounds,
                                        static_cast<int64_t>(mode), psw, padding_idx, grad_weight,
                                        grad_psw);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CUDA, m) {
  if (CudaKernels::enabled()) embedding_bag::register_impls<CudaKernels>(m);
}

}  // namespace metalcore
