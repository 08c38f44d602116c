// Shared entry points. Each family writes its ops once (<family>.h: validate, lay out, allocate)
// as templates over a backend struct B that supplies the kernels and a device guard type; the CPU
// and CUDA files only bind kernels (see rmsnorm_cpu.cpp / rmsnorm_cuda.cpp). One copy of every
// check means every backend rejects the same inputs with the same message.
#pragma once

#include <c10/core/Device.h>

namespace metalcore {

// Guard for backends without a current-device notion (CPU).
struct NoDeviceGuard {
  explicit NoDeviceGuard(c10::Device) {}
};

}  // namespace metalcore
