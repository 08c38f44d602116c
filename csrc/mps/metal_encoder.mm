// Metal backend of Encoder. The only code that touches Metal: it loads the kernel library once,
// caches one pipeline state per host name (checked against the kernels' simdgroup assumptions
// when it is created), and translates recorded Encoder calls into commands on
// PyTorch's current MPS stream, following PyTorch's MPS extension pattern (getCurrentMPSStream,
// dispatch_sync on the stream's queue with exceptions relayed, the stream's shared compute
// encoder, the tensor's MTLBuffer, byte offsets = storage_offset * element_size). Only TORCH_API
// symbols of torch are used: the extension links against torch's exported interface alone.
// Compiled without ARC.
#include "mps/metal_encoder.h"

#include <ATen/mps/MPSDevice.h>
#include <ATen/mps/MPSStream.h>
#include <c10/util/Exception.h>

#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <cstring>
#include <exception>
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
//
// Failures are kept, not retried: loading the libraries is all or nothing, and its first error is
// raised again by every later call (a partly loaded set would answer "not in the kernel library"
// for the kernels of the file that failed and hide the compiler's message); a pipeline that cannot
// be created, or that fails check_pipeline_limits, raises the same error on every later use.
// Errors are turned into exceptions outside the autorelease pools, so no pool is left undrained.
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
    if (auto failed = failures_.find(name); failed != failures_.end()) {
      TORCH_CHECK(false, failed->second);
    }

    load_libraries();
    std::string error;
    id<MTLComputePipelineState> pso = nil;
    @autoreleasepool {  // may run on any thread, outside PyTorch's queues
      pso = create(name, error);
    }
    if (pso == nil) {
      failures_.emplace(name, error);
      TORCH_CHECK(false, error);
    }
    // Once per pipeline, with the values this GPU reports for it.
    try {
      check_pipeline_limits(name, static_cast<uint32_t>(pso.threadExecutionWidth),
                            static_cast<uint32_t>(pso.maxTotalThreadsPerThreadgroup));
    } catch (const c10::Error& e) {
      [pso release];
      failures_.emplace(name, e.what_without_backtrace());
      throw;
    }
    pipelines_.emplace(name, pso);  // kept for the life of the process
    return pso;
  }

 private:
  static std::string describe(NSError* error) {
    return error != nil ? std::string(error.localizedDescription.UTF8String) : "unknown error";
  }

  // The pipeline of kernel `name` (+1 retained), or nil with `error` set. Caller holds the lock
  // and an autorelease pool, and has loaded the libraries.
  id<MTLComputePipelineState> create(const std::string& name, std::string& error) {
    NSString* ns_name = [NSString stringWithUTF8String:name.c_str()];
    id<MTLFunction> fn = nil;
    for (id<MTLLibrary> lib : libraries_) {
      fn = [lib newFunctionWithName:ns_name];
      if (fn != nil) break;
    }
    if (fn == nil) {
      error = "metalcore: Metal kernel '" + name + "' is not in the kernel library";
      return nil;
    }
    NSError* ns_error = nil;
    id<MTLComputePipelineState> pso = [device() newComputePipelineStateWithFunction:fn
                                                                              error:&ns_error];
    [fn release];
    if (pso == nil) {
      error = "metalcore: cannot create the pipeline of '" + name + "': " + describe(ns_error);
    }
    return pso;
  }

  // All or nothing: libraries_ is set only once every library has loaded.
  void load_libraries() {
    if (!libraries_.empty()) return;
    TORCH_CHECK(load_error_.empty(), load_error_);
    std::vector<id<MTLLibrary>> loaded;
    std::string error;
    @autoreleasepool {
      error = load_all(loaded);
    }
    if (!error.empty()) {
      for (id<MTLLibrary> lib : loaded) [lib release];
      load_error_ = error;
      TORCH_CHECK(false, error);
    }
    libraries_ = std::move(loaded);
  }

  // Appends each kernel library (+1 retained) to `loaded`; returns the first error, or "".
  static std::string load_all(std::vector<id<MTLLibrary>>& loaded) {
    NSError* error = nil;
#if METALCORE_EMBEDDED_METALLIB
    dispatch_data_t data =
        dispatch_data_create(metalcore_generated::kMetallib, sizeof(metalcore_generated::kMetallib),
                             nullptr, DISPATCH_DATA_DESTRUCTOR_DEFAULT);
    id<MTLLibrary> lib = [device() newLibraryWithData:data error:&error];
    dispatch_release(data);
    if (lib == nil) return "metalcore: cannot load the embedded metallib: " + describe(error);
    loaded.push_back(lib);
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
      if (lib == nil) {
        return std::string("metalcore: cannot compile the Metal kernels of ") + src.name + ": " +
               describe(error);
      }
      loaded.push_back(lib);
    }
#endif
    return "";
  }

  std::shared_mutex mutex_;
  std::vector<id<MTLLibrary>> libraries_;
  std::string load_error_;  // the first load failure, raised again by every later call
  std::unordered_map<std::string, id<MTLComputePipelineState>> pipelines_;
  std::unordered_map<std::string, std::string> failures_;  // host name -> its first error
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

// Replays recorded commands on the stream's shared compute encoder: consecutive ops coalesce into
// one encoder; PyTorch ends and commits it at its next synchronisation point (no commit or wait
// here). Runs on the stream's queue.
void encode(at::mps::MPSStream* stream, const std::vector<Command>& commands) {
  id<MTLComputeCommandEncoder> enc = stream->commandEncoder();
  for (const Command& c : commands) {
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
  // Encoding runs on the stream's serial queue, like PyTorch's own MPS ops. A C++ exception must
  // not unwind through libdispatch (the process would terminate), so the block catches it and it
  // is rethrown here. PyTorch's helper for this, at::mps::dispatch_sync_with_rethrow, is not
  // TORCH_API: torch's libraries hide what is not (its Linux wheel shows them as local symbols),
  // so an extension cannot count on linking it.
  __block std::exception_ptr error;
  dispatch_sync(stream->queue(), ^() {
    @autoreleasepool {
      try {
        encode(stream, *commands);
      } catch (...) {
        error = std::current_exception();
      }
    }
  });
  impl_->commands.clear();
  if (error) std::rethrow_exception(error);
}

}  // namespace metalcore::mps
