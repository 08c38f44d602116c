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
