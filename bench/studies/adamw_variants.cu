// Standalone timing of AdamW kernel variants (fp32, 64 tensors, ~268M params), CUDA events.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>
namespace cg = cooperative_groups;
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

template <int THREADS, int MINB, int U, long long CHUNK, bool CONTIG, bool PERSIST>
__global__ void __launch_bounds__(THREADS, MINB) k(const __grid_constant__ Meta meta, H hp) {
  const long long total = meta.cs[meta.n];
  long long w0, w1, ws;
  if (!PERSIST) {
    w0 = blockIdx.x;
    w1 = w0 + 1;
    ws = 1;
  } else if (CONTIG) {
    long long per = (total + gridDim.x - 1) / gridDim.x;
    w0 = blockIdx.x * per;
    w1 = min(total, w0 + per);
    ws = 1;
  } else {
    w0 = blockIdx.x;
    w1 = total;
    ws = gridDim.x;
  }
  int tcached = -1;
  float step_size = 0, bc2 = 0;
  const float decay = 1.f - hp.lr * hp.wd;
  for (long long w = w0; w < w1; w += ws) {
    int lo = 0, hi = meta.n - 1;
    while (lo < hi) {
      int mid = (lo + hi + 1) / 2;
      if (meta.cs[mid] <= w)
        lo = mid;
      else
        hi = mid - 1;
    }
    const int t = lo;
    if (t != tcached) {
      double st = *meta.step[t] + 1.0;
      step_size = (float)(hp.lr / (1.0 - pow((double)hp.b1, st)));
      bc2 = (float)sqrt(1.0 - pow((double)hp.b2, st));
      tcached = t;
    }
    float* p = meta.p[t];
    const float* g = meta.g[t];
    float* m = meta.m[t];
    float* v = meta.v[t];
    const long long begin = (w - meta.cs[t]) * CHUNK, end = min(begin + CHUNK, meta.numel[t]);
    constexpr long long S = THREADS * 4;
    for (long long i0 = begin + threadIdx.x * 4; i0 < end; i0 += U * S) {
      float4 pv[U], gv[U], mv[U], vv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        long long i = i0 + u * S;
        if (i < end) {
          pv[u] = *(float4*)(p + i);
          gv[u] = __ldcs((const float4*)(g + i));
          mv[u] = *(float4*)(m + i);
          vv[u] = *(float4*)(v + i);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        long long i = i0 + u * S;
        if (i < end) {
          float* pp = &pv[u].x;
          float* gg = &gv[u].x;
          float* mm = &mv[u].x;
          float* vq = &vv[u].x;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            float pa = pp[j] * decay;
            float ga = gg[j];
            mm[j] += (1.f - hp.b1) * (ga - mm[j]);
            vq[j] = hp.b2 * vq[j] + (1.f - hp.b2) * ga * ga;
            pp[j] = pa - step_size * mm[j] / (sqrtf(vq[j]) / bc2 + hp.eps);
          }
          *(float4*)(p + i) = pv[u];
          *(float4*)(m + i) = mv[u];
          *(float4*)(v + i) = vv[u];
        }
      }
    }
  }
  if (PERSIST) cg::this_grid().sync();
}

template <int THREADS, int MINB, int U, long long CHUNK, bool CONTIG, bool PERSIST>
void bench(const char* name, Meta base, const std::vector<long long>& numel, double bytes) {
  Meta meta = base;
  meta.cs[0] = 0;
  for (int t = 0; t < meta.n; ++t) meta.cs[t + 1] = meta.cs[t] + (numel[t] + CHUNK - 1) / CHUNK;
  auto kern = k<THREADS, MINB, U, CHUNK, CONTIG, PERSIST>;
  int per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, THREADS, 0);
  cudaFuncAttributes fa;
  cudaFuncGetAttributes(&fa, kern);
  int sms;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  long long total = meta.cs[meta.n];
  int grid = PERSIST ? (int)std::min<long long>(total, (long long)per_sm * sms) : (int)total;
  H hp{1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f};
  void* args[] = {&meta, &hp};
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<float> ts;
  for (int r = 0; r < 15; ++r) {
    cudaEventRecord(a);
    if (PERSIST)
      cudaLaunchCooperativeKernel((void*)kern, grid, THREADS, args, 0, 0);
    else
      kern<<<grid, THREADS>>>(meta, hp);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    ts.push_back(ms);
  }
  std::sort(ts.begin() + 3, ts.end());
  float med = ts[3 + (ts.size() - 3) / 2];
  cudaError_t e = cudaGetLastError();
  printf("%-34s regs=%3d blocks/SM=%d grid=%7d  %.3f ms  %6.0f GB/s %s\n", name, fa.numRegs, per_sm,
         grid, med, bytes / med / 1e6, e ? cudaGetErrorString(e) : "");
}

int main() {
  const int n = 64;
  const long long per = 268435456LL / 64;
  std::vector<long long> numel(n, per);
  for (int i = 0; i < n; i += 3)
    numel[i] = per - 1000 + 16 * i;  // uneven sizes, still 16-B aligned
  long long tot = 0;
  for (auto x : numel) tot += (x + 63) / 64 * 64;
  float *P, *G, *M, *V, *ST;
  cudaMalloc(&P, tot * 4);
  cudaMalloc(&G, tot * 4);
  cudaMalloc(&M, tot * 4);
  cudaMalloc(&V, tot * 4);
  cudaMalloc(&ST, 4 * n);
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
  // copy ceiling
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
  bench<256, 3, 2, 8192, false, true>("persist stride U2 minB3 (current)", base, numel, bytes);
  bench<256, 4, 2, 8192, false, true>("persist stride U2 minB4", base, numel, bytes);
  bench<256, 3, 2, 8192, true, true>("persist contig U2 minB3", base, numel, bytes);
  bench<256, 4, 2, 8192, true, true>("persist contig U2 minB4", base, numel, bytes);
  bench<512, 2, 2, 8192, true, true>("persist contig 512t U2 minB2", base, numel, bytes);
  bench<256, 2, 4, 16384, true, true>("persist contig U4 minB2", base, numel, bytes);
  bench<256, 4, 1, 1024, false, false>("grid 1 chunk/block 1024 U1", base, numel, bytes);
  bench<256, 4, 2, 2048, false, false>("grid 1 chunk/block 2048 U2", base, numel, bytes);
  bench<256, 4, 2, 4096, false, false>("grid 1 chunk/block 4096 U2", base, numel, bytes);
  bench<128, 8, 2, 1024, false, false>("grid 128t 1024 U2", base, numel, bytes);
  bench<512, 2, 2, 4096, false, false>("grid 512t 4096 U2", base, numel, bytes);
  bench<256, 3, 2, 8192, false, true>("persist stride U2 minB3 (again)", base, numel, bytes);
  return 0;
}
