// Standalone timing of rope forward variants: bf16, HF layout (q/k transposed views of
// [B, S, H, D]), B4 S4096 Hq32 Hk8 D128, cos/sin [1, S, D] bf16. CUDA events, medians.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>
typedef __nv_bfloat16 bf;
constexpr int B = 4, S = 4096, HQ = 32, HK = 8, D = 128, H = HQ + HK;
constexpr int VEC = 8, SLOTS = D / 2 / VEC;  // 8 slots per head

template <bool SAME_LAYOUT, bool T16, int MINB, int MODE, int TPB>
__global__ void __launch_bounds__(SLOTS* H* TPB, MINB)
    k(const bf* __restrict__ q, const bf* __restrict__ kk, const bf* __restrict__ cs,
      const bf* __restrict__ sn, bf* __restrict__ qo, bf* __restrict__ ko) {
  const int slot = threadIdx.x % SLOTS;
  const int r = threadIdx.x / SLOTS;
  const int h = r % H;
  const int tok = blockIdx.x * TPB + r / H;
  const int b = tok / S, s = tok % S;
  // input strides (token-major storage): q [B,S,HQ,D], k [B,S,HK,D]
  const bf* x = h < HQ ? q + ((long long)(b * S + s) * HQ + h) * D
                       : kk + ((long long)(b * S + s) * HK + (h - HQ)) * D;
  bf* y;
  if (SAME_LAYOUT)
    y = h < HQ ? qo + ((long long)(b * S + s) * HQ + h) * D
               : ko + ((long long)(b * S + s) * HK + (h - HQ)) * D;
  else
    y = h < HQ ? qo + (((long long)b * HQ + h) * S + s) * D
               : ko + (((long long)b * HK + h - HQ) * S + s) * D;
  const int e0 = slot * VEC, e1 = e0 + D / 2;
  int4 x0 = *(const int4*)(x + e0), x1 = *(const int4*)(x + e1);
  if (MODE == 1) {
    *(int4*)(y + e0) = x0;
    *(int4*)(y + e1) = x1;
    return;
  }  // pure copy
  const bf* cr = cs + (long long)s * D;
  const bf* sr = sn + (long long)s * D;
  int4 c0 = __ldg((const int4*)(cr + e0)), c1 = __ldg((const int4*)(cr + e1));
  int4 s0 = __ldg((const int4*)(sr + e0)), s1 = __ldg((const int4*)(sr + e1));
  const bf* a = (const bf*)&x0;
  const bf* bb = (const bf*)&x1;
  const bf* C0 = (const bf*)&c0;
  const bf* C1 = (const bf*)&c1;
  const bf* S0 = (const bf*)&s0;
  const bf* S1 = (const bf*)&s1;
  int4 o0, o1;
  bf* O0 = (bf*)&o0;
  bf* O1 = (bf*)&o1;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    float fa = __bfloat162float(a[j]), fb = __bfloat162float(bb[j]);
    O0[j] = __float2bfloat16(fa * __bfloat162float(C0[j]) - fb * __bfloat162float(S0[j]));
    O1[j] = __float2bfloat16(fb * __bfloat162float(C1[j]) + fa * __bfloat162float(S1[j]));
  }
  *(int4*)(y + e0) = o0;
  *(int4*)(y + e1) = o1;
}

// Committed-kernel-like: tables converted to float right after load (as in load_table).
template <int MINB>
__global__ void __launch_bounds__(SLOTS* H, MINB)
    kf(const bf* __restrict__ q, const bf* __restrict__ kk, const bf* __restrict__ cs,
       const bf* __restrict__ sn, bf* __restrict__ qo, bf* __restrict__ ko) {
  const int slot = threadIdx.x % SLOTS;
  const int h = threadIdx.x / SLOTS;
  const long long tok = blockIdx.x;
  const long long b = tok / S, s = tok % S;
  const bf* x = h < HQ ? q + ((b * S + s) * HQ + h) * D : kk + ((b * S + s) * HK + (h - HQ)) * D;
  bf* y = h < HQ ? qo + ((b * HQ + h) * S + s) * D : ko + ((b * HK + h - HQ) * S + s) * D;
  const int e0 = slot * VEC, e1 = e0 + D / 2;
  int4 x0 = *(const int4*)(x + e0);
  const bf* cr = cs + s * D;
  const bf* sr = sn + s * D;
  float c0[VEC], s0[VEC], c1[VEC], s1[VEC];
  {
    int4 t = __ldg((const int4*)(cr + e0));
    for (int j = 0; j < VEC; ++j) c0[j] = __bfloat162float(((bf*)&t)[j]);
  }
  {
    int4 t = __ldg((const int4*)(sr + e0));
    for (int j = 0; j < VEC; ++j) s0[j] = __bfloat162float(((bf*)&t)[j]);
  }
  int4 x1 = *(const int4*)(x + e1);
  {
    int4 t = __ldg((const int4*)(cr + e1));
    for (int j = 0; j < VEC; ++j) c1[j] = __bfloat162float(((bf*)&t)[j]);
  }
  {
    int4 t = __ldg((const int4*)(sr + e1));
    for (int j = 0; j < VEC; ++j) s1[j] = __bfloat162float(((bf*)&t)[j]);
  }
  const bf* a = (const bf*)&x0;
  const bf* bb = (const bf*)&x1;
  int4 o0, o1;
  bf* O0 = (bf*)&o0;
  bf* O1 = (bf*)&o1;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    float fa = __bfloat162float(a[j]), fb = __bfloat162float(bb[j]);
    O0[j] = __float2bfloat16(fa * c0[j] - fb * s0[j]);
    O1[j] = __float2bfloat16(fb * c1[j] + fa * s1[j]);
  }
  *(int4*)(y + e0) = o0;
  *(int4*)(y + e1) = o1;
}

template <typename K>
void bench(const char* name, K kern, int threads, int grid, double bytes, bf* q, bf* kk, bf* cs,
           bf* sn, bf* qo, bf* ko) {
  cudaFuncAttributes fa;
  cudaFuncGetAttributes(&fa, kern);
  int per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, threads, 0);
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<float> ts;
  for (int r = 0; r < 40; ++r) {
    cudaEventRecord(a);
    kern<<<grid, threads>>>(q, kk, cs, sn, qo, ko);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    ts.push_back(ms);
  }
  std::sort(ts.begin() + 5, ts.end());
  float med = ts[5 + (ts.size() - 5) / 2];
  cudaError_t e = cudaGetLastError();
  printf("%-44s regs=%3d blocks/SM=%d  %.4f ms  %6.0f GB/s %s\n", name, fa.numRegs, per_sm, med,
         bytes / med / 1e6, e ? cudaGetErrorString(e) : "");
}

int main() {
  const long long nq = (long long)B * S * HQ * D, nk = (long long)B * S * HK * D;
  bf *q, *kk, *cs, *sn, *qo, *ko;
  cudaMalloc(&q, nq * 2);
  cudaMalloc(&kk, nk * 2);
  cudaMalloc(&qo, nq * 2);
  cudaMalloc(&ko, nk * 2);
  cudaMalloc(&cs, S * D * 2);
  cudaMalloc(&sn, S * D * 2);
  cudaMemset(q, 0x3c, nq * 2);
  cudaMemset(kk, 0x3b, nk * 2);
  cudaMemset(cs, 0x3a, S * D * 2);
  cudaMemset(sn, 0x39, S * D * 2);
  const double bytes = 2.0 * (nq + nk) * 2;
  {
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    std::vector<float> ts;
    for (int r = 0; r < 20; ++r) {
      cudaEventRecord(a);
      cudaMemcpyAsync(qo, q, nq * 2, cudaMemcpyDeviceToDevice);
      cudaMemcpyAsync(ko, kk, nk * 2, cudaMemcpyDeviceToDevice);
      cudaEventRecord(b);
      cudaEventSynchronize(b);
      float ms;
      cudaEventElapsedTime(&ms, a, b);
      ts.push_back(ms);
    }
    std::sort(ts.begin(), ts.end());
    printf("copy ceiling (memcpy q,k) %.0f GB/s\n", bytes / ts[10] / 1e6);
  }
  const int tokens = B * S, th = SLOTS * H;
  for (int rep = 0; rep < 2; ++rep) {
    bench("committed-like (float tables)", kf<1>, th, tokens, bytes, q, kk, cs, sn, qo, ko);
    bench("committed-like minB6", kf<6>, th, tokens, bytes, q, kk, cs, sn, qo, ko);
    bench("16-bit tables", k<false, true, 1, 0, 1>, th, tokens, bytes, q, kk, cs, sn, qo, ko);
    bench("16-bit tables minB6", k<false, true, 6, 0, 1>, th, tokens, bytes, q, kk, cs, sn, qo, ko);
    bench("16-bit tables 2 tok/block", k<false, true, 1, 0, 2>, 2 * th, tokens / 2, bytes, q, kk,
          cs, sn, qo, ko);
    bench("16-bit tables, out in input layout", k<true, true, 1, 0, 1>, th, tokens, bytes, q, kk,
          cs, sn, qo, ko);
    bench("copy, transposed -> contiguous", k<false, true, 1, 1, 1>, th, tokens, bytes, q, kk, cs,
          sn, qo, ko);
    bench("copy, same layout", k<true, true, 1, 1, 1>, th, tokens, bytes, q, kk, cs, sn, qo, ko);
  }
  return 0;
}
