// Shared entry points. Each family writes its ops once (<family>.h: validate, lay out, allocate)
// as templates over a backend object b that supplies the kernels, a device guard type and hooks
// for the backend's own limits; the CPU, CUDA and Metal files only bind kernels (see
// rmsnorm_cpu.cpp, rmsnorm_cuda.cpp, rmsnorm_launch.cpp). One copy of every check means every
// backend rejects the same inputs with the same message.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

namespace metalcore {

// Guard for backends without a current-device notion (CPU).
struct NoDeviceGuard {
  explicit NoDeviceGuard(c10::Device) {}
};

// Hooks a backend without extra limits inherits: every dtype and size the shared checks accept.
struct NoBackendLimits {
  // `t` (named `arg`) is the op's primary input, already validated by the family's checks.
  static void check(const char* /*op*/, const char* /*arg*/, const at::Tensor& /*t*/) {}
};

}  // namespace metalcore

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace metalcore {

// Hooks for a CUDA backend whose kernels compile (CI's nvcc check) but have not yet run on a GPU.
// Such a family binds its kernels with this base instead of NoBackendLimits and registers them
// only where enabled() (`if (CudaKernels::enabled()) register_impls<CudaKernels>(m);`), i.e. with
// METALCORE_CUDA_UNVALIDATED=1 set before the library loads. Otherwise the op has no CUDA kernel:
// a direct call gets the dispatcher's "could not run ... 'CUDA' backend" error, and the modules
// and the model patch (metalcore._dispatch.kernel_applies) run PyTorch's own math on CUDA tensors
// instead of failing. check() still refuses a call if the variable was unset after
// loading. A family switches to NoBackendLimits once its CUDA tests have passed on a GPU
// (scripts/gpu_check.sh sets the variable for that first run).
struct UnvalidatedCudaLimits {
  static bool enabled() {
    const char* v = std::getenv("METALCORE_CUDA_UNVALIDATED");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }
  static void check(const char* op, const char* /*arg*/, const at::Tensor& /*t*/) {
    TORCH_CHECK_NOT_IMPLEMENTED(enabled(), "metalcore.", op,
                                ": the CUDA kernel has not been validated on a GPU yet; set "
                                "METALCORE_CUDA_UNVALIDATED=1 to run it anyway, or run the op on "
                                "the CPU");
  }
};

}  // namespace metalcore
