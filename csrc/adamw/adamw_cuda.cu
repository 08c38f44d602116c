// CUDA kernel of metalcore::adamw (entry point and validation in adamw_cuda.cpp): one cooperative
// launch updates every tensor of the lists. Tensor pointers, sizes and chunk offsets travel in the
// kernel's parameter block (no host-to- device copy, no host sync); a persistent grid walks
// fixed-size chunks, finds each chunk's tensor by binary search, and after a grid-wide barrier
// increments the device step counters (every block must have read the old step before any is
// written). lr is read on the device when it is a CUDA tensor, on the host (no sync) when it is a
// CPU tensor.
#include <ATen/Dispatch.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <vector>

#include "adamw/adamw_cuda.h"
#include "common/cuda_utils.cuh"

namespace metalcore {
namespace {

namespace cg = cooperative_groups;
using cuda::AdamwHyper;

constexpr int kThreads = 256;
constexpr int kVec = 4;
constexpr int64_t kChunk = kThreads * kVec * 8;  // elements per work item

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

template <typename P, typename S, int MAXT>
__global__ void __launch_bounds__(kThreads, 3)
    adamw_kernel(const __grid_constant__ Meta<MAXT> meta, const AdamwHyper hp) {
  using A = cuda::acc_t<P>;
  const double lr_d = hp.lr_ptr == nullptr ? hp.lr
                      : hp.lr_double       ? *static_cast<const double*>(hp.lr_ptr)
                                     : static_cast<double>(*static_cast<const float*>(hp.lr_ptr));
  const A lr = static_cast<A>(lr_d);
  const A beta1 = static_cast<A>(hp.beta1), beta2 = static_cast<A>(hp.beta2);
  const A eps = static_cast<A>(hp.eps);
  const A decay = static_cast<A>(1.0 - lr_d * hp.wd);
  const int64_t total = meta.chunk_start[meta.n];

  for (int64_t w = blockIdx.x; w < total; w += gridDim.x) {
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
    const A step_size = static_cast<A>(lr_d / (1.0 - pow(hp.beta1, step)));
    const A bc2_sqrt = static_cast<A>(sqrt(1.0 - pow(hp.beta2, step)));
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
      ma += (A(1) - beta1) * (ga - ma);
      va = beta2 * va + (A(1) - beta2) * ga * ga;
      A denom;
      if (hp.amsgrad) {
        mva = max(mva, va);
        denom = sqrt(mva) / bc2_sqrt + eps;
      } else {
        denom = sqrt(va) / bc2_sqrt + eps;
      }
      pa -= step_size * ma / denom;
    };

    if (meta.aligned[t]) {
      // Two vectors per thread per iteration: all loads are issued before the first use.
      constexpr int64_t kStride = kThreads * kVec;
      for (int64_t i0 = begin + threadIdx.x * kVec; i0 < end; i0 += 2 * kStride) {
        cuda::Vec<P, kVec> pv[2], gv[2];
        cuda::Vec<S, kVec> mvv[2], vv[2], xv[2];
        bool full[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int64_t i = i0 + u * kStride;
          full[u] = i + kVec <= end;
          if (full[u]) {
            pv[u] = cuda::load_vec<P, kVec>(p + i);
            gv[u] = cuda::load_vec_stream<P, kVec>(g + i);
            mvv[u] = cuda::load_vec<S, kVec>(m + i);
            vv[u] = cuda::load_vec<S, kVec>(v + i);
            if (hp.amsgrad) xv[u] = cuda::load_vec<S, kVec>(mv + i);
          }
        }
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int64_t i = i0 + u * kStride;
          if (full[u]) {
#pragma unroll
            for (int j = 0; j < kVec; ++j) {
              A pa = static_cast<A>(pv[u].v[j]), ma = static_cast<A>(mvv[u].v[j]),
                va = static_cast<A>(vv[u].v[j]);
              A mva = hp.amsgrad ? static_cast<A>(xv[u].v[j]) : A(0);
              update(pa, static_cast<A>(gv[u].v[j]), ma, va, mva);
              pv[u].v[j] = P(pa);
              mvv[u].v[j] = S(ma);
              vv[u].v[j] = S(va);
              if (hp.amsgrad) xv[u].v[j] = S(mva);
            }
            cuda::store_vec(p + i, pv[u]);
            cuda::store_vec(m + i, mvv[u]);
            cuda::store_vec(v + i, vv[u]);
            if (hp.amsgrad) cuda::store_vec(mv + i, xv[u]);
          } else {
            for (int64_t e = i; e < end; ++e) {  // the tensor's last partial vector
              A pa = static_cast<A>(p[e]), ma = static_cast<A>(m[e]), va = static_cast<A>(v[e]);
              A mva = hp.amsgrad ? static_cast<A>(mv[e]) : A(0);
              update(pa, static_cast<A>(g[e]), ma, va, mva);
              p[e] = P(pa);
              m[e] = S(ma);
              v[e] = S(va);
              if (hp.amsgrad) mv[e] = S(mva);
            }
          }
        }
      }
    } else {
      for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) {
        A pa = static_cast<A>(p[e]), ma = static_cast<A>(m[e]), va = static_cast<A>(v[e]);
        A mva = hp.amsgrad ? static_cast<A>(mv[e]) : A(0);
        update(pa, static_cast<A>(g[e]), ma, va, mva);
        p[e] = P(pa);
        m[e] = S(ma);
        v[e] = S(va);
        if (hp.amsgrad) mv[e] = S(mva);
      }
    }
  }

  // The device step counters change only after every block has read them.
  cg::this_grid().sync();
  if (blockIdx.x == 0) {
    for (int t = threadIdx.x; t < meta.n; t += blockDim.x) {
      if (meta.step[t] == nullptr) continue;
      if (hp.step_double) {
        *static_cast<double*>(meta.step[t]) += 1.0;
      } else {
        *static_cast<float*>(meta.step[t]) += 1.0f;
      }
    }
  }
}

int resident_blocks(const void* kernel) {
  static std::mutex mu;
  static std::map<const void*, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(kernel);
  if (it != cache.end()) return it->second;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  TORCH_CHECK(per_sm > 0, "metalcore.adamw: kernel does not fit on the device");
  cache[kernel] = per_sm;
  return per_sm;
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
  if (chunks == 0 && std::none_of(meta.step, meta.step + count, [](void* s) { return s; })) return;
  auto kernel = adamw_kernel<P, S, MAXT>;
  const int64_t resident =
      static_cast<int64_t>(resident_blocks(reinterpret_cast<const void*>(kernel))) *
      cuda::sm_count();
  const int grid = static_cast<int>(std::max<int64_t>(1, std::min(chunks, resident)));
  AdamwHyper h = hp;
  void* args[] = {&meta, &h};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, kThreads,
                                             args, 0, cuda::current_stream()));
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
          if (count <= 32) {
            launch_group<P, float, 32>(p, g, m, v, mv, st, idx, first, count, hp);
          } else {
            launch_group<P, float, 256>(p, g, m, v, mv, st, idx, first, count, hp);
          }
        } else {
          if (count <= 32) {
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
