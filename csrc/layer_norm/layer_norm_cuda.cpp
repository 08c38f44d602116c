// CUDA backend of the LayerNorm family: the shared entry points (layer_norm.h) over the
// launchers of layer_norm_cuda.cu. Host code, error messages included, stays out of the .cu file.
// The kernels compile in CI but have not run on a GPU: they are registered
// only with METALCORE_CUDA_UNVALIDATED=1 (UnvalidatedCudaLimits).
#include "layer_norm/layer_norm_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "layer_norm/layer_norm.h"

namespace metalcore {
namespace {

struct CudaKernels : UnvalidatedCudaLimits {
  using Guard = c10::cuda::CUDAGuard;
  static void forward(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                      const at::Tensor& bias, double eps, const at::Tensor& out,
                      const at::Tensor& residual_out) {
    cuda::launch_layer_norm_forward(x, residual, weight, bias, eps, out, residual_out);
  }
  static void backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& grad_residual, double eps, const at::Tensor& grad_input,
                       const at::Tensor& grad_weight, const at::Tensor& grad_bias) {
    cuda::launch_layer_norm_backward(grad_out, x, weight, grad_residual, eps, grad_input,
                                     grad_weight, grad_bias);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CUDA, m) {
  if (CudaKernels::enabled()) layer_norm::register_impls<CudaKernels>(m);
}

}  // namespace metalcore
