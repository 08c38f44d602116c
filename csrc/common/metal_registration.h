// How a family's Metal launch layer (csrc/<family>/<family>_launch.cpp) registers its op kernels.
// The launch files are compiled into two libraries, and a compile definition of each (CMake)
// says which Encoder their kernels run on and where they register:
//  - METALCORE_METAL_MPS (macOS, libmetalcore_ops): the `metalcore` ops at the MPS key, on a
//    MetalEncoder that encodes into PyTorch's current MPS stream;
//  - METALCORE_METAL_MSIM (Linux tests, libmetalcore_msim_ops): the test-only `metalcore_msim`
//    ops at the CPU key, on an MsimEncoder that runs the kernels under msim on CPU tensors.
// A launch file ends with
//   METALCORE_METAL_IMPL(m) { m.impl("op", on_metal<&op>); ... }
//   const RegisterKernelNames registered_names(&family_kernel_names);
// so adding a family touches no central list.
#pragma once

#include <c10/core/DeviceType.h>
#include <torch/library.h>

#include <string>
#include <utility>
#include <vector>

#include "common/encoder.h"

#if defined(METALCORE_METAL_MPS) == defined(METALCORE_METAL_MSIM)
#error \
    "compile the Metal launch layer with exactly one of METALCORE_METAL_MPS, METALCORE_METAL_MSIM"
#endif

#if defined(METALCORE_METAL_MPS)
#include "mps/metal_encoder.h"
#define METALCORE_METAL_IMPL(m) TORCH_LIBRARY_IMPL(metalcore, MPS, m)
namespace metalcore {
using MetalTargetEncoder = mps::MetalEncoder;
// The device of the tensors the kernels run on.
constexpr c10::DeviceType kMetalTargetDevice = c10::DeviceType::MPS;
}  // namespace metalcore
#else
#include "msim/msim_encoder.h"
#define METALCORE_METAL_IMPL(m) TORCH_LIBRARY_IMPL(metalcore_msim, CPU, m)
namespace metalcore {
using MetalTargetEncoder = msim::MsimEncoder;
constexpr c10::DeviceType kMetalTargetDevice = c10::DeviceType::CPU;
}  // namespace metalcore
#endif

namespace metalcore {

// The op kernel that runs launch function Fn on a fresh encoder of this library's backend.
template <auto Fn>
constexpr auto on_metal = &WithEncoder<MetalTargetEncoder, Fn>::call;

// Every kernel host name the launch layers of this library can select, gathered from the
// families' registrars: the msim tests check that each exists in the compiled kernel library and
// that each kernel there is selectable.
using KernelNamesFn = std::vector<std::string> (*)();

inline std::vector<KernelNamesFn>& kernel_names_registry() {
  static std::vector<KernelNamesFn> sources;
  return sources;
}

// One static instance per launch file; runs when the library loads (before any op can run).
struct RegisterKernelNames {
  explicit RegisterKernelNames(KernelNamesFn names) { kernel_names_registry().push_back(names); }
};

inline std::vector<std::string> launch_kernel_names() {
  std::vector<std::string> all;
  for (KernelNamesFn names : kernel_names_registry()) {
    for (std::string& n : names()) all.push_back(std::move(n));
  }
  return all;
}

}  // namespace metalcore
