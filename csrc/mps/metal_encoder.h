// The Metal backend of Encoder (macOS): records the launch layer's calls, then encodes them into
// PyTorch's current MPS stream in finish(). Plain C++ header; Metal types stay in the .mm file.
#pragma once

#include <memory>
#include <string>

#include "common/encoder.h"

namespace metalcore::mps {

class MetalEncoder final : public Encoder {
 public:
  MetalEncoder();
  ~MetalEncoder() override;
  MetalEncoder(const MetalEncoder&) = delete;
  MetalEncoder& operator=(const MetalEncoder&) = delete;

  void set_pipeline(const std::string& host_name) override;
  uint32_t max_threads_per_threadgroup() override;
  void set_bytes(unsigned index, const void* data, size_t length) override;
  void dispatch_threadgroups(Dim3 threadgroups, Dim3 threads_per_threadgroup) override;
  void dispatch_threads(Dim3 threads, Dim3 threads_per_threadgroup) override;
  void finish() override;

 protected:
  void set_buffer(unsigned index, const at::Tensor& t, size_t offset, size_t length) override;
  uint64_t storage_address(const at::Tensor& t, size_t offset) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace metalcore::mps
