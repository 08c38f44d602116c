// The Encoder interface: everything the launch layer (csrc/<family>/<family>_launch.cpp) needs
// from a Metal compute encoder. Backends: Metal (csrc/mps/, macOS) and msim (csrc/msim/, Linux
// tests). Launch code chooses host names and grids and binds arguments only through this class,
// so the code that runs on Apple GPUs is the code the Linux tests execute.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "kernels/common/defines.h"

namespace metalcore {

struct Dim3 {
  uint32_t x = 1, y = 1, z = 1;
};

class Encoder {
 public:
  virtual ~Encoder() = default;

  // Selects the compute pipeline of kernel `host_name` for the following binds and dispatches.
  virtual void set_pipeline(const std::string& host_name) = 0;
  // Largest threadgroup the selected pipeline accepts (register use can make it < 1024).
  virtual uint32_t max_threads_per_threadgroup() = 0;
  // Binds a tensor's storage at its first element: offset = storage_offset * element_size.
  void set_tensor(unsigned index, const at::Tensor& t) {
    set_buffer(index, t, byte_offset(t), byte_extent(t));
  }
  virtual void set_bytes(unsigned index, const void* data, size_t length) = 0;
  template <typename T>
  void set_value(unsigned index, const T& value) {
    set_bytes(index, &value, sizeof(T));
  }
  // Address a kernel can dereference (metadata tables of multi-tensor kernels); also marks the
  // tensor's storage as used (read and written) by the following dispatches.
  uint64_t device_address(const at::Tensor& t) { return storage_address(t, byte_offset(t)); }
  virtual void dispatch_threadgroups(Dim3 threadgroups, Dim3 threads_per_threadgroup) = 0;
  // Non-uniform grid: edge threadgroups shrink (Apple GPUs support this natively).
  virtual void dispatch_threads(Dim3 threads, Dim3 threads_per_threadgroup) = 0;
  // Called once after the launch function returned: a recording backend encodes here.
  virtual void finish() {}

  static size_t byte_offset(const at::Tensor& t) {
    return static_cast<size_t>(t.storage_offset()) * t.element_size();
  }
  // Bytes from the first element to one past the last one the tensor's strides can reach.
  static size_t byte_extent(const at::Tensor& t) {
    if (t.numel() == 0) return 0;
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    return static_cast<size_t>(last + 1) * t.element_size();
  }

 protected:
  // Binds t's storage (an MTLBuffer for MPS tensors, host memory under msim) at byte `offset`;
  // `length` bytes from there are reachable through t's strides.
  virtual void set_buffer(unsigned index, const at::Tensor& t, size_t offset, size_t length) = 0;
  virtual uint64_t storage_address(const at::Tensor& t, size_t offset) = 0;
};

// Checks a compute pipeline against what the kernels and the launch layer assume, with the values
// the GPU reports for it (MTLComputePipelineState's threadExecutionWidth and
// maxTotalThreadsPerThreadgroup). The kernels are written for 32-lane simdgroups (kSimdWidth):
// threadgroup_sum keeps one partial per simdgroup in `scratch[32]` and adds them with a single
// simd_sum, and the launch layer sizes threadgroups in whole simdgroups. Every Apple-silicon GPU
// runs 32 lanes; on a GPU that does not, the sums would be silently wrong, so each backend calls
// this once per pipeline, when it creates it, and the op raises instead.
inline void check_pipeline_limits(const std::string& host_name, uint32_t execution_width,
                                  uint32_t max_threads_per_threadgroup) {
  TORCH_CHECK(execution_width == kSimdWidth, "metalcore: Metal kernel '", host_name, "' runs ",
              execution_width,
              "-wide simdgroups on this GPU (threadExecutionWidth), "
              "but metalcore's Metal kernels are written for ",
              kSimdWidth,
              "-wide simdgroups (every Apple-silicon GPU); run metalcore ops on the CPU here");
  TORCH_CHECK(
      max_threads_per_threadgroup >= kSimdWidth, "metalcore: Metal kernel '", host_name,
      "' allows only ", max_threads_per_threadgroup,
      " threads per threadgroup on this GPU (maxTotalThreadsPerThreadgroup), fewer than one ",
      kSimdWidth, "-wide simdgroup");
}

// Adapts a launch function `R fn(Encoder&, Args...)` to an op kernel `R (Args...)` running on a
// fresh backend encoder E: how the MPS key and the msim test ops register the same launch code.
template <class E, auto Fn>
struct WithEncoder;
template <class E, typename R, typename... Args, R (*Fn)(Encoder&, Args...)>
struct WithEncoder<E, Fn> {
  static R call(Args... args) {
    E enc;
    if constexpr (std::is_void_v<R>) {
      Fn(enc, std::forward<Args>(args)...);
      enc.finish();
    } else {
      R result = Fn(enc, std::forward<Args>(args)...);
      enc.finish();
      return result;
    }
  }
};

}  // namespace metalcore
