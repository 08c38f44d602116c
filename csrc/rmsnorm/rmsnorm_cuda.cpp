// CUDA backend of the RMSNorm family: the shared entry points (rmsnorm.h) over the launchers of
// rmsnorm_cuda.cu. Host code, error messages included, stays out of the .cu file.
#include "rmsnorm/rmsnorm_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "rmsnorm/rmsnorm.h"

namespace metalcore {
namespace {

struct CudaKernels : NoBackendLimits {
  using Guard = c10::cuda::CUDAGuard;
  static void forward(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                      double eps, const at::Tensor& out, const at::Tensor& residual_out) {
    cuda::launch_forward(x, residual, weight, eps, out, residual_out);
  }
  static void backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& grad_residual, double eps, const at::Tensor& grad_input,
                       const at::Tensor& grad_weight) {
    cuda::launch_backward(grad_out, x, weight, grad_residual, eps, grad_input, grad_weight);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CUDA, m) { rmsnorm::register_impls<CudaKernels>(m); }

}  // namespace metalcore
