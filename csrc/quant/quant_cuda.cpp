// CUDA backend of the quantization family: the shared entry points (quant.h) over the launchers
// of quant_cuda.cu. No GPU has run these kernels yet, so they are bound with
// UnvalidatedCudaLimits and registered only with METALCORE_CUDA_UNVALIDATED=1.
#include "quant/quant_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "quant/quant.h"

namespace metalcore {
namespace {

struct CudaKernels : UnvalidatedCudaLimits {
  using Guard = c10::cuda::CUDAGuard;
  static void dequantize(const quant::QWeight& w, const at::Tensor& out) {
    cuda::quant_dequantize(w, out);
  }
  static void linear(const at::Tensor& x, const quant::QWeight& w, const at::Tensor& bias,
                     const at::Tensor& out) {
    cuda::quant_linear(x, w, bias, out);
  }
  static void linear_backward(const at::Tensor& grad, const quant::QWeight& w,
                              const at::Tensor& grad_input) {
    cuda::quant_linear_backward(grad, w, grad_input);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, CUDA, m) {
  if (CudaKernels::enabled()) quant::register_impls<CudaKernels>(m);
}

}  // namespace metalcore
