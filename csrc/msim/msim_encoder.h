// The msim backend of Encoder (Linux tests): the launch layer's calls go to a kernel library
// that msim compiled from kernels/*.metal, running the kernels on CPU tensors' memory.
#pragma once

#include <string>
#include <vector>

#include "common/encoder.h"

struct msim_encoder;

namespace metalcore::msim {

// Opens the msim kernel library at `path` (once per process; a different path is an error).
void load_library(const std::string& path);
// Option applied to every later encoder (msim_set_option keys, plus "max_threads": the
// threadgroup limit reported to the launch layer, as a Metal pipeline reports its own; and
// "execution_width": the simdgroup width the pipelines report, checked at set_pipeline as the
// Metal backend checks threadExecutionWidth, so tests can play a GPU that is not 32 lanes wide).
void set_option(const std::string& key, const std::string& value);
std::vector<std::string> library_kernel_names();
std::vector<std::string> dispatched_kernel_names();

class MsimEncoder final : public Encoder {
 public:
  MsimEncoder();
  ~MsimEncoder() override;
  MsimEncoder(const MsimEncoder&) = delete;
  MsimEncoder& operator=(const MsimEncoder&) = delete;

  void set_pipeline(const std::string& host_name) override;
  uint32_t max_threads_per_threadgroup() override;
  void set_bytes(unsigned index, const void* data, size_t length) override;
  void dispatch_threadgroups(Dim3 threadgroups, Dim3 threads_per_threadgroup) override;
  void dispatch_threads(Dim3 threads, Dim3 threads_per_threadgroup) override;

 protected:
  void set_buffer(unsigned index, const at::Tensor& t, size_t offset, size_t length) override;
  uint64_t storage_address(const at::Tensor& t, size_t offset) override;

 private:
  msim_encoder* enc_;
};

}  // namespace metalcore::msim
