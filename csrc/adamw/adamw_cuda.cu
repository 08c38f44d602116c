// CUDA kernel of metalcore::adamw (entry point and validation in adamw_cuda.cpp): one launch
// updates every tensor of the lists. Tensor pointers, sizes and chunk offsets travel in the
// kernel's parameter block (no host-to-device copy, no host sync). Each block updates one chunk of
// kChunk elements (one 16-byte-or-smaller vector per thread per array), finding its tensor by
// binary search; small blocks that exit early keep many threads per SM resident. Measured on an
// H100 (bench/results/README.md): 2987 GB/s, 99.5% of the copy ceiling, against 2783 for an
// earlier persistent cooperative grid (78 registers per thread).
//
// Device step counters: every block reads its tensor's step at its start; the last block to sign
// off on a per-stream counter increments them, so no block can read an already-incremented step.
// lr is read on the device when it is a CUDA tensor, on the host (no sync) when it is a CPU tensor.
#include <ATen/Dispatch.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "adamw/adamw_cuda.h"
#include "common/cuda_utils.cuh"

namespace metalcore {
namespace {

using cuda::AdamwHyper;

constexpr int kThreads = 256;
constexpr int kVec = 4;
constexpr int64_t kChunk = kThreads * kVec;  // elements per block

template <int MAXT>
struct Meta {
  void* p[MAXT];
  const void* g[MAXT];
  void* m[MAXT];
  void* v[MAXT];
  void* mv[MAXT];
  void* step[MAXT];  // device step counter, or nullptr when the host step is in hstep
  float hstep[MAXT];
  int64_t numel[MAXT];
  int64_t chunk_start[MAXT + 1];
  unsigned char aligned[MAXT];
  int n;
};

template <typename P, typename S, int MAXT, bool AMSGRAD>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const __grid_constant__ Meta<MAXT> meta, const AdamwHyper hp,
                 unsigned int* __restrict__ done) {
  using A = cuda::acc_t<P>;
  const int64_t w = blockIdx.x;
  if (w < meta.chunk_start[meta.n]) {
    const double lr_d = hp.lr_ptr == nullptr ? hp.lr
                        : hp.lr_double       ? *static_cast<const double*>(hp.lr_ptr)
                                       : static_cast<double>(*static_cast<const float*>(hp.lr_ptr));
    int lo = 0, hi = meta.n - 1;  // last t with chunk_start[t] <= w
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (meta.chunk_start[mid] <= w)
        lo = mid;
      else
        hi = mid - 1;
    }
    const int t = lo;
    double step;
    if (meta.step[t] == nullptr) {
      step = meta.hstep[t];
    } else {
      step = (hp.step_double ? *static_cast<const double*>(meta.step[t])
                             : static_cast<double>(*static_cast<const float*>(meta.step[t]))) +
             1.0;
    }
    // Bias corrections in double, like torch's reference, once per block.
    const A step_size = static_cast<A>(lr_d / (1.0 - pow(hp.beta1, step)));
    const A bc2_sqrt = static_cast<A>(sqrt(1.0 - pow(hp.beta2, step)));
    const A beta1 = static_cast<A>(hp.beta1), beta2 = static_cast<A>(hp.beta2);
    const A eps = static_cast<A>(hp.eps);
    const A decay = static_cast<A>(1.0 - lr_d * hp.wd);
    P* p = static_cast<P*>(meta.p[t]);
    const P* g = static_cast<const P*>(meta.g[t]);
    S* m = static_cast<S*>(meta.m[t]);
    S* v = static_cast<S*>(meta.v[t]);
    S* mv = static_cast<S*>(meta.mv[t]);
    const int64_t begin = (w - meta.chunk_start[t]) * kChunk;
    const int64_t end = min(begin + kChunk, meta.numel[t]);

    auto update = [&](A& pa, A ga, A& ma, A& va, A& mva) {
      if (hp.maximize) ga = -ga;
      pa *= decay;
      ma += (A(1) - beta1) * (ga - ma);  // torch's lerp
      va = beta2 * va + (A(1) - beta2) * ga * ga;
      A denom;
      if constexpr (AMSGRAD) {
        mva = va > mva || va != va ? va : mva;  // NaN-propagating max, like torch.maximum
        denom = sqrt(mva) / bc2_sqrt + eps;
      } else {
        denom = sqrt(va) / bc2_sqrt + eps;
      }
      pa -= step_size * ma / denom;
    };

    const int64_t i = begin + threadIdx.x * kVec;
    if (meta.aligned[t] && i + kVec <= end) {
      auto pv = cuda::load_vec<P, kVec>(p + i);
      const auto gv = cuda::load_vec_stream<P, kVec>(g + i);
      auto mvv = cuda::load_vec<S, kVec>(m + i);
      auto vv = cuda::load_vec<S, kVec>(v + i);
      cuda::Vec<S, kVec> xv;
      if constexpr (AMSGRAD) xv = cuda::load_vec<S, kVec>(mv + i);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        A pa = static_cast<A>(pv.v[j]), ma = static_cast<A>(mvv.v[j]), va = static_cast<A>(vv.v[j]);
        A mva = AMSGRAD ? static_cast<A>(xv.v[j]) : A(0);
        update(pa, static_cast<A>(gv.v[j]), ma, va, mva);
        pv.v[j] = P(pa);
        mvv.v[j] = S(ma);
        vv.v[j] = S(va);
        if constexpr (AMSGRAD) xv.v[j] = S(mva);
      }
      cuda::store_vec(p + i, pv);
      cuda::store_vec(m + i, mvv);
      cuda::store_vec(v + i, vv);
      if constexpr (AMSGRAD) cuda::store_vec(mv + i, xv);
    } else {
      // A misaligned tensor, or the tensor's last partial vector: element by element.
      for (int64_t e = i; e < min(i + kVec, end); ++e) {
        A pa = static_cast<A>(p[e]), ma = static_cast<A>(m[e]), va = static_cast<A>(v[e]);
        A mva = AMSGRAD ? static_cast<A>(mv[e]) : A(0);
        update(pa, static_cast<A>(g[e]), ma, va, mva);
        p[e] = P(pa);
        m[e] = S(ma);
        v[e] = S(va);
        if constexpr (AMSGRAD) mv[e] = S(mva);
      }
    }
  }

  if (done == nullptr) return;  // no device step counters
  // Every thread of this block has read the step (above: the value fed its update) before
  // thread 0 signs off, and the block that signs off last increments the counters, so no read
  // can see an incremented step. Only the step reads must precede the sign-off, not this block's
  // stores, so no memory fence: a __threadfence() here (waiting for the stores) cost 4% of the
  // kernel's time on an H100 (bench/results/README.md).
  __syncthreads();
  __shared__ bool last;
  if (threadIdx.x == 0) {
    last = atomicAdd(done, 1u) == gridDim.x - 1;
    // Every other block has signed off: reset the counter for the stream's next launch.
    if (last) *done = 0u;
  }
  __syncthreads();
  if (!last) return;
  for (int t = threadIdx.x; t < meta.n; t += blockDim.x) {
    if (meta.step[t] == nullptr) continue;
    if (hp.step_double) {
      *static_cast<double*>(meta.step[t]) += 1.0;
    } else {
      *static_cast<float*>(meta.step[t]) += 1.0f;
    }
  }
}

// The sign-off counter for a launch on `stream`. Each stream keeps one counter for the process's
// life, zeroed once and reset by the last block of every launch, so a step costs no allocation
// and no memset. Launches on one stream
// are ordered, so they never share the counter at the same time; each stream has its own. While
// the stream is being captured into a CUDA graph, the graph gets its own counter instead, zeroed
// by a captured memset, so replays never depend on state outside the graph.
unsigned int* signoff_counter(cudaStream_t stream, const at::Device& device,
                              at::Tensor& capture_counter) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const auto options = at::TensorOptions().device(device).dtype(at::kInt);
  if (capture != cudaStreamCaptureStatusNone) {
    capture_counter = at::empty({1}, options);
    C10_CUDA_CHECK(cudaMemsetAsync(capture_counter.data_ptr(), 0, sizeof(int), stream));
    return reinterpret_cast<unsigned int*>(capture_counter.data_ptr());
  }
  static std::mutex mutex;
  // Never destroyed: freeing device memory during static destruction races the CUDA runtime's
  // own teardown.
  static auto* counters = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& counter = (*counters)[{device.index(), stream}];
  if (!counter.defined()) counter = at::zeros({1}, options);  // zeroed on this stream
  return reinterpret_cast<unsigned int*>(counter.data_ptr());
}

template <typename P, typename S, int MAXT>
void launch_group(const std::vector<at::Tensor>& p, const std::vector<at::Tensor>& g,
                  const std::vector<at::Tensor>& m, const std::vector<at::Tensor>& v,
                  const std::vector<at::Tensor>& mv, const std::vector<at::Tensor>& steps,
                  const std::vector<int64_t>& idx, size_t first, size_t count,
                  const AdamwHyper& hp) {
  Meta<MAXT> meta;
  meta.n = static_cast<int>(count);
  meta.chunk_start[0] = 0;
  bool device_steps = false;
  for (size_t j = 0; j < count; ++j) {
    const int64_t i = idx[first + j];
    meta.p[j] = p[i].data_ptr();
    meta.g[j] = g[i].const_data_ptr();
    meta.m[j] = m[i].data_ptr();
    meta.v[j] = v[i].data_ptr();
    meta.mv[j] = hp.amsgrad ? mv[i].data_ptr() : nullptr;
    if (steps[i].is_cuda()) {
      meta.step[j] = steps[i].data_ptr();
      meta.hstep[j] = 0.f;
      device_steps = true;
    } else {
      meta.step[j] = nullptr;
      meta.hstep[j] = static_cast<float>(steps[i].item<double>());
    }
    meta.numel[j] = p[i].numel();
    meta.chunk_start[j + 1] = meta.chunk_start[j] + cuda::ceil_div(p[i].numel(), kChunk);
    bool al = cuda::aligned16(meta.p[j]) && cuda::aligned16(meta.g[j]) &&
              cuda::aligned16(meta.m[j]) && cuda::aligned16(meta.v[j]);
    if (hp.amsgrad) al = al && cuda::aligned16(meta.mv[j]);
    meta.aligned[j] = al ? 1 : 0;
  }
  const int64_t chunks = meta.chunk_start[count];
  if (chunks == 0 && !device_steps) return;
  TORCH_CHECK(chunks < INT32_MAX, "metalcore.adamw: too many elements in one launch");
  const cudaStream_t stream = cuda::current_stream();
  // A captured step's counter; freeing it after the launch is enqueued is safe (the allocator is
  // stream-ordered).
  at::Tensor capture_counter;
  unsigned int* done_ptr = nullptr;
  if (device_steps) done_ptr = signoff_counter(stream, p[idx[first]].device(), capture_counter);
  const auto grid = static_cast<unsigned>(std::max<int64_t>(1, chunks));
  if (hp.amsgrad) {
    adamw_kernel<P, S, MAXT, true><<<grid, kThreads, 0, stream>>>(meta, hp, done_ptr);
  } else {
    adamw_kernel<P, S, MAXT, false><<<grid, kThreads, 0, stream>>>(meta, hp, done_ptr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

namespace cuda {

void launch_adamw(const std::vector<at::Tensor>& p, const std::vector<at::Tensor>& g,
                  const std::vector<at::Tensor>& m, const std::vector<at::Tensor>& v,
                  const std::vector<at::Tensor>& mv, const std::vector<at::Tensor>& st,
                  const AdamwHyper& hp) {
  const size_t n = p.size();
  // One launch per (param dtype, state dtype) group and per 256 tensors.
  std::map<std::pair<int, int>, std::vector<int64_t>> groups;
  for (size_t i = 0; i < n; ++i) {
    groups[{static_cast<int>(p[i].scalar_type()), static_cast<int>(m[i].scalar_type())}].push_back(
        static_cast<int64_t>(i));
  }
  for (const auto& kv : groups) {
    const auto& key = kv.first;
    const std::vector<int64_t>& idx = kv.second;
    const auto pt = static_cast<at::ScalarType>(key.first);
    const bool fp32_state = static_cast<at::ScalarType>(key.second) == at::kFloat;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pt, "adamw_cuda", [&] {
      using P = scalar_t;
      for (size_t first = 0; first < idx.size(); first += 256) {
        const size_t count = std::min<size_t>(256, idx.size() - first);
        if (fp32_state && !std::is_same_v<P, float>) {
          if (count <= 4) {
            launch_group<P, float, 4>(p, g, m, v, mv, st, idx, first, count, hp);
          } else if (count <= 32) {
            launch_group<P, float, 32>(p, g, m, v, mv, st, idx, first, count, hp);
          } else {
            launch_group<P, float, 256>(p, g, m, v, mv, st, idx, first, count, hp);
          }
        } else {
          if (count <= 4) {
            launch_group<P, P, 4>(p, g, m, v, mv, st, idx, first, count, hp);
          } else if (count <= 32) {
            launch_group<P, P, 32>(p, g, m, v, mv, st, idx, first, count, hp);
          } else {
            launch_group<P, P, 256>(p, g, m, v, mv, st, idx, first, count, hp);
          }
        }
      }
    });
  }
}

}  // namespace cuda
}  // namespace metalcore
