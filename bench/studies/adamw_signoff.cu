// Standalone timing of AdamW step sign-off variants (fp32, 64 tensors, ~268M params), CUDA events.
// Kernel body = committed design (one 256-thread block per 1024-element chunk); only the way the
// device step counters get incremented differs.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>
constexpr int MAXT = 64;
struct Meta {
  float* p[MAXT];
  const float* g[MAXT];
  float* m[MAXT];
  float* v[MAXT];
  float* step[MAXT];
  long long numel[MAXT];
  long long cs[MAXT + 1];
  int n;
};
struct H {
  float lr, b1, b2, eps, wd;
};
constexpr int T = 256;
constexpr long long CH = 1024;
enum Mode { NONE = 0, FENCE = 1, NOFENCE = 2, SHARD = 3, SELFRESET = 4 };
constexpr int NSHARD = 128;

__device__ __forceinline__ void body(const Meta& meta, const H& hp, long long w) {
  int lo = 0, hi = meta.n - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (meta.cs[mid] <= w)
      lo = mid;
    else
      hi = mid - 1;
  }
  const int t = lo;
  double st = *meta.step[t] + 1.0;
  const float step_size = (float)(hp.lr / (1.0 - pow((double)hp.b1, st)));
  const float bc2 = (float)sqrt(1.0 - pow((double)hp.b2, st));
  const float decay = 1.f - hp.lr * hp.wd;
  float* p = meta.p[t];
  const float* g = meta.g[t];
  float* m = meta.m[t];
  float* v = meta.v[t];
  const long long begin = (w - meta.cs[t]) * CH, end = min(begin + CH, meta.numel[t]);
  const long long i = begin + threadIdx.x * 4;
  if (i + 4 <= end) {
    float4 pv = *(float4*)(p + i), gv = __ldcs((const float4*)(g + i)), mv = *(float4*)(m + i),
           vv = *(float4*)(v + i);
    float* pp = &pv.x;
    float* gg = &gv.x;
    float* mm = &mv.x;
    float* vq = &vv.x;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float pa = pp[j] * decay;
      float ga = gg[j];
      mm[j] += (1.f - hp.b1) * (ga - mm[j]);
      vq[j] = hp.b2 * vq[j] + (1.f - hp.b2) * ga * ga;
      pp[j] = pa - step_size * mm[j] / (sqrtf(vq[j]) / bc2 + hp.eps);
    }
    *(float4*)(p + i) = pv;
    *(float4*)(m + i) = mv;
    *(float4*)(v + i) = vv;
  }
}

__device__ __forceinline__ void bump(const Meta& meta) {
  for (int t = threadIdx.x; t < meta.n; t += blockDim.x) *meta.step[t] += 1.f;
}

template <int MODE, int CPB>
__global__ void __launch_bounds__(T) k(const __grid_constant__ Meta meta, H hp, unsigned* cnt) {
  const long long total = meta.cs[meta.n];
  for (int c = 0; c < CPB; ++c) {
    long long w = (long long)blockIdx.x * CPB + c;
    if (w < total) body(meta, hp, w);
  }
  if (MODE == NONE) return;
  __syncthreads();
  __shared__ bool last;
  if (threadIdx.x == 0) {
    if (MODE == FENCE) __threadfence();
    if (MODE == SHARD) {
      const unsigned s = blockIdx.x % NSHARD;
      const unsigned members = gridDim.x / NSHARD + (s < gridDim.x % NSHARD ? 1u : 0u);
      bool l = atomicAdd(cnt + 1 + s, 1u) == members - 1;
      if (l) {
        cnt[1 + s] = 0;
        l = atomicAdd(cnt, 1u) == min((unsigned)NSHARD, gridDim.x) - 1;
        if (l) cnt[0] = 0;
      }
      last = l;
    } else {
      last = atomicAdd(cnt, 1u) == gridDim.x - 1;
      if (MODE == SELFRESET && last) cnt[0] = 0;
    }
  }
  __syncthreads();
  if (last) bump(meta);
}

__global__ void bump_kernel(const __grid_constant__ Meta meta) { bump(meta); }

template <int MODE, int CPB>
void bench(const char* name, Meta base, const std::vector<long long>& numel, double bytes,
           unsigned* cnt, bool memset, bool second) {
  Meta meta = base;
  meta.cs[0] = 0;
  for (int t = 0; t < meta.n; ++t) meta.cs[t + 1] = meta.cs[t] + (numel[t] + CH - 1) / CH;
  long long total = meta.cs[meta.n];
  int grid = (int)((total + CPB - 1) / CPB);
  H hp{1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f};
  cudaFuncAttributes fa;
  cudaFuncGetAttributes(&fa, k<MODE, CPB>);
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<float> ts;
  for (int r = 0; r < 25; ++r) {
    cudaEventRecord(a);
    if (memset) cudaMemsetAsync(cnt, 0, 4);
    k<MODE, CPB><<<grid, T>>>(meta, hp, cnt);
    if (second) bump_kernel<<<1, 64>>>(meta);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    ts.push_back(ms);
  }
  std::sort(ts.begin() + 5, ts.end());
  float med = ts[5 + (ts.size() - 5) / 2];
  cudaError_t e = cudaGetLastError();
  printf("%-40s regs=%3d grid=%7d  %.4f ms  %6.0f GB/s %s\n", name, fa.numRegs, grid, med,
         bytes / med / 1e6, e ? cudaGetErrorString(e) : "");
}

int main() {
  const int n = 64;
  const long long per = 268435456LL / 64;
  std::vector<long long> numel(n, per);
  for (int i = 0; i < n; i += 3) numel[i] = per - 1000 + 16 * i;
  long long tot = 0;
  for (auto x : numel) tot += (x + 63) / 64 * 64;
  float *P, *G, *M, *V, *ST;
  unsigned* CNT;
  cudaMalloc(&P, tot * 4);
  cudaMalloc(&G, tot * 4);
  cudaMalloc(&M, tot * 4);
  cudaMalloc(&V, tot * 4);
  cudaMalloc(&ST, 4 * n);
  cudaMalloc(&CNT, 4 * (NSHARD + 1));
  cudaMemset(CNT, 0, 4 * (NSHARD + 1));
  cudaMemset(P, 0x3c, tot * 4);
  cudaMemset(G, 0x3b, tot * 4);
  cudaMemset(M, 0x3a, tot * 4);
  cudaMemset(V, 0x39, tot * 4);
  cudaMemset(ST, 0, 4 * n);
  Meta base;
  base.n = n;
  long long off = 0;
  long long params = 0;
  for (int t = 0; t < n; ++t) {
    base.p[t] = P + off;
    base.g[t] = G + off;
    base.m[t] = M + off;
    base.v[t] = V + off;
    base.step[t] = ST + t;
    base.numel[t] = numel[t];
    off += (numel[t] + 63) / 64 * 64;
    params += numel[t];
  }
  double bytes = 28.0 * params;
  {
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    std::vector<float> ts;
    for (int r = 0; r < 10; ++r) {
      cudaEventRecord(a);
      cudaMemcpyAsync(M, P, tot * 4, cudaMemcpyDeviceToDevice);
      cudaEventRecord(b);
      cudaEventSynchronize(b);
      float ms;
      cudaEventElapsedTime(&ms, a, b);
      ts.push_back(ms);
    }
    std::sort(ts.begin(), ts.end());
    printf("copy ceiling %.0f GB/s\n", 2.0 * tot * 4 / ts[5] / 1e6);
  }
  for (int rep = 0; rep < 2; ++rep) {
    bench<NONE, 1>("no sign-off (bound)", base, numel, bytes, CNT, false, false);
    bench<FENCE, 1>("fence+atomic+memset (committed)", base, numel, bytes, CNT, true, false);
    bench<NOFENCE, 1>("atomic+memset, no fence", base, numel, bytes, CNT, true, false);
    bench<SELFRESET, 1>("atomic self-reset, no fence/memset", base, numel, bytes, CNT, false,
                        false);
    bench<SHARD, 1>("128 sharded counters self-reset", base, numel, bytes, CNT, false, false);
    bench<NOFENCE, 2>("atomic+memset, 2 chunks/block", base, numel, bytes, CNT, true, false);
    bench<NOFENCE, 4>("atomic+memset, 4 chunks/block", base, numel, bytes, CNT, true, false);
    bench<NONE, 4>("no sign-off, 4 chunks/block", base, numel, bytes, CNT, false, false);
    bench<NONE, 1>("no sign-off + bump kernel", base, numel, bytes, CNT, false, true);
  }
  return 0;
}
