// Metal backend of Encoder. The only code that touches Metal: it loads the kernel library once,
// caches one pipeline state per host name, and translates recorded Encoder calls into commands on
// PyTorch's current MPS stream, following PyTorch's MPS extension pattern (getCurrentMPSStream,
// dispatch_sync_with_rethrow on the stream's queue, the stream's shared compute encoder, the
// tensor's MTLBuffer, byte offsets = storage_offset * element_size). Compiled without ARC.
#include "mps/metal_encoder.h"

#include <ATen/mps/MPSDevice.h>
#include <ATen/mps/MPSStream.h>
#include <c10/util/Exception.h>

#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <cstring>
#include <mutex>
#include <shared_mutex>
#include <unordered_map>
#include <vector>

// Generated at build time (cmake/metal.cmake): the precompiled metallib bytes, or the kernels'
// sources with their includes inlined when the build machine has no Metal compiler.
#include "metalcore_kernels.h"

namespace metalcore::mps {
namespace {

// An MPS tensor's storage data pointer is its MTLBuffer (the same bit cast as PyTorch's
// getMTLBufferStorage; defined here, as PyTorch's MPS extension sample does, to avoid pulling in
// the MPSGraph-heavy OperationUtils.h).
id<MTLBuffer> getMTLBufferStorage(const at::Tensor& t) {
  return __builtin_bit_cast(id<MTLBuffer>, t.storage().data());
}

id<MTLDevice> device() { return at::mps::MPSDevice::getInstance()->device(); }

// Kernel libraries (one metallib, or one per embedded source file) and pipeline states, created
// once per process; lookups after the first take a shared lock only.
class PipelineCache {
 public:
  static PipelineCache& instance() {
    static PipelineCache cache;
    return cache;
  }

  id<MTLComputePipelineState> get(const std::string& name) {
    {
      std::shared_lock<std::shared_mutex> lock(mutex_);
      auto it = pipelines_.find(name);
      if (it != pipelines_.end()) return it->second;
    }
    std::unique_lock<std::shared_mutex> lock(mutex_);
    auto it = pipelines_.find(name);
    if (it != pipelines_.end()) return it->second;
    @autoreleasepool {  // may run on any thread, outside PyTorch's queues
      return create(name);
    }
  }

 private:
  id<MTLComputePipelineState> create(const std::string& name) {
    load_libraries();
    id<MTLFunction> fn = nil;
    for (id<MTLLibrary> lib : libraries_) {
      fn = [lib newFunctionWithName:[NSString stringWithUTF8String:name.c_str()]];
      if (fn != nil) break;
    }
    TORCH_CHECK(fn != nil, "metalcore: Metal kernel '", name, "' is not in the kernel library");
    NSError* error = nil;
    id<MTLComputePipelineState> pso = [device() newComputePipelineStateWithFunction:fn
                                                                              error:&error];
    [fn release];
    TORCH_CHECK(pso != nil, "metalcore: cannot create the pipeline of '", name,
                "': ", error ? error.localizedDescription.UTF8String : "unknown error");
    pipelines_.emplace(name, pso);  // kept for the life of the process
    return pso;
  }

  void load_libraries() {
    if (!libraries_.empty()) return;
    NSError* error = nil;
#if METALCORE_EMBEDDED_METALLIB
    dispatch_data_t data =
        dispatch_data_create(metalcore_generated::kMetallib, sizeof(metalcore_generated::kMetallib),
                             nullptr, DISPATCH_DATA_DESTRUCTOR_DEFAULT);
    id<MTLLibrary> lib = [device() newLibraryWithData:data error:&error];
    dispatch_release(data);
    TORCH_CHECK(lib != nil, "metalcore: cannot load the embedded metallib: ",
                error ? error.localizedDescription.UTF8String : "unknown error");
    libraries_.push_back(lib);
#else
    MTLCompileOptions* options = [[MTLCompileOptions new] autorelease];
    options.languageVersion = MTLLanguageVersion3_1;  // bfloat
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wdeprecated-declarations"
    options.fastMathEnabled = NO;  // kernels rely on IEEE inf/nan and precise exp/rsqrt
#pragma clang diagnostic pop
    for (const auto& src : metalcore_generated::kSources) {
      id<MTLLibrary> lib = [device() newLibraryWithSource:[NSString stringWithUTF8String:src.text]
                                                  options:options
                                                    error:&error];
      TORCH_CHECK(lib != nil, "metalcore: cannot compile ", src.name, ": ",
                  error ? error.localizedDescription.UTF8String : "unknown error");
      libraries_.push_back(lib);
    }
#endif
  }

  std::shared_mutex mutex_;
  std::vector<id<MTLLibrary>> libraries_;
  std::unordered_map<std::string, id<MTLComputePipelineState>> pipelines_;
};

struct Command {
  enum class Kind { kPipeline, kBuffer, kBytes, kUseResource, kDispatchGroups, kDispatchThreads };
  Kind kind;
  id<MTLComputePipelineState> pso = nil;
  unsigned index = 0;
  at::Tensor tensor;  // keeps the storage alive until it is encoded
  size_t offset = 0;
  std::vector<uint8_t> bytes;
  MTLSize grid{}, group{};
};

MTLSize mtl_size(Dim3 d) { return MTLSizeMake(d.x, d.y, d.z); }

}  // namespace

struct MetalEncoder::Impl {
  std::vector<Command> commands;
  id<MTLComputePipelineState> current = nil;
};

MetalEncoder::MetalEncoder() : impl_(std::make_unique<Impl>()) {}
MetalEncoder::~MetalEncoder() = default;

void MetalEncoder::set_pipeline(const std::string& host_name) {
  impl_->current = PipelineCache::instance().get(host_name);
  Command c{Command::Kind::kPipeline};
  c.pso = impl_->current;
  impl_->commands.push_back(std::move(c));
}

uint32_t MetalEncoder::max_threads_per_threadgroup() {
  TORCH_CHECK(impl_->current != nil, "metalcore: no pipeline selected");
  return static_cast<uint32_t>(impl_->current.maxTotalThreadsPerThreadgroup);
}

void MetalEncoder::set_buffer(unsigned index, const at::Tensor& t, size_t offset, size_t length) {
  TORCH_CHECK(t.device().is_mps(), "metalcore: expected an MPS tensor, got ", t.device());
  Command c{Command::Kind::kBuffer};
  c.index = index;
  c.tensor = t;
  c.offset = offset;
  impl_->commands.push_back(std::move(c));
}

uint64_t MetalEncoder::storage_address(const at::Tensor& t, size_t offset) {
  TORCH_CHECK(t.device().is_mps(), "metalcore: expected an MPS tensor, got ", t.device());
  // Indirectly accessed buffers must be declared resident on the encoder (useResource).
  Command c{Command::Kind::kUseResource};
  c.tensor = t;
  impl_->commands.push_back(std::move(c));
  return getMTLBufferStorage(t).gpuAddress + offset;
}

void MetalEncoder::set_bytes(unsigned index, const void* data, size_t length) {
  TORCH_CHECK(length <= 4096, "metalcore: set_bytes is limited to 4 KB by Metal, got ", length);
  Command c{Command::Kind::kBytes};
  c.index = index;
  c.bytes.assign(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + length);
  impl_->commands.push_back(std::move(c));
}

void MetalEncoder::dispatch_threadgroups(Dim3 threadgroups, Dim3 threads) {
  Command c{Command::Kind::kDispatchGroups};
  c.grid = mtl_size(threadgroups);
  c.group = mtl_size(threads);
  impl_->commands.push_back(std::move(c));
}

void MetalEncoder::dispatch_threads(Dim3 grid, Dim3 threads) {
  Command c{Command::Kind::kDispatchThreads};
  c.grid = mtl_size(grid);
  c.group = mtl_size(threads);
  impl_->commands.push_back(std::move(c));
}

void MetalEncoder::finish() {
  if (impl_->commands.empty()) return;
  at::mps::MPSStream* stream = at::mps::getCurrentMPSStream();
  const std::vector<Command>* commands = &impl_->commands;
  at::mps::dispatch_sync_with_rethrow(stream->queue(), ^() {
    @autoreleasepool {
      // The stream's shared compute encoder: consecutive ops coalesce into one encoder; PyTorch
      // ends and commits it at its next synchronisation point (no commit or wait here).
      id<MTLComputeCommandEncoder> enc = stream->commandEncoder();
      for (const Command& c : *commands) {
        switch (c.kind) {
          case Command::Kind::kPipeline:
            [enc setComputePipelineState:c.pso];
            break;
          case Command::Kind::kBuffer:
            [enc setBuffer:getMTLBufferStorage(c.tensor) offset:c.offset atIndex:c.index];
            break;
          case Command::Kind::kBytes:
            [enc setBytes:c.bytes.data() length:c.bytes.size() atIndex:c.index];
            break;
          case Command::Kind::kUseResource:
            [enc useResource:getMTLBufferStorage(c.tensor)
                       usage:MTLResourceUsageRead | MTLResourceUsageWrite];
            break;
          case Command::Kind::kDispatchGroups:
            [enc dispatchThreadgroups:c.grid threadsPerThreadgroup:c.group];
            break;
          case Command::Kind::kDispatchThreads:
            [enc dispatchThreads:c.grid threadsPerThreadgroup:c.group];
            break;
        }
      }
    }
  });
  impl_->commands.clear();
}

}  // namespace metalcore::mps
