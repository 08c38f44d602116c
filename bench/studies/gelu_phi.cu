// GELU (erf) forward cost per formulation of Phi(x), bf16 16384x14336, and Phi's accuracy.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>
typedef __nv_bfloat16 bf;

template <int V>
__device__ __forceinline__ float phi(float x) {
  const float k = 0.7071067811865476f;
  if (V == 0) return 0.5f * (1.f + erff(x * k));
  if (V == 1) return 0.5f * erfcf(-x * k);
  if (V == 2) return normcdff(x);
  if (V == 3) {
    const float e = erfcf(fabsf(x) * k);
    return x < 0.f ? 0.5f * e : 1.f - 0.5f * e;
  }
  if (V == 4) return x > -1.f ? 0.5f * (1.f + erff(x * k)) : 0.5f * erfcf(-x * k);
  return 0.f;
}

template <int V>
__global__ void __launch_bounds__(256)
    gelu(const bf* __restrict__ in, bf* __restrict__ out, long long n) {
  long long i = ((long long)blockIdx.x * 256 + threadIdx.x) * 8;
  if (i + 8 > n) return;
  int4 r = __ldcs((const int4*)(in + i));
  const bf* e = (const bf*)&r;
  int4 o;
  bf* oe = (bf*)&o;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    float x = __bfloat162float(e[j]);
    oe[j] = __float2bfloat16(x * phi<V>(x));
  }
  *(int4*)(out + i) = o;
}

template <int V>
__global__ void acc(int n, double* err) {  // max relative error of phi over x in [-12, 8]
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float x = -12.f + 20.f * i / n;
  double ref = 0.5 * erfc(-(double)x / sqrt(2.0));
  double got = phi<V>(x);
  double rel = ref > 1e-35 ? fabs(got - ref) / ref : 0.0;
  // atomicMax on doubles via their ordered bit pattern (non-negative)
  atomicMax((unsigned long long*)err, (unsigned long long)__double_as_longlong(rel));
}

template <int V>
void run(const char* name, bf* in, bf* out, long long n, double* derr) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<float> ts;
  unsigned grid = (unsigned)(n / 8 / 256);
  for (int r = 0; r < 30; ++r) {
    cudaEventRecord(a);
    gelu<V><<<grid, 256>>>(in, out, n);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    ts.push_back(ms);
  }
  std::sort(ts.begin() + 5, ts.end());
  float med = ts[5 + (ts.size() - 5) / 2];
  cudaMemset(derr, 0, 8);
  const int m = 1 << 22;
  acc<V><<<m / 256, 256>>>(m, derr);
  double e;
  cudaMemcpy(&e, derr, 8, cudaMemcpyDeviceToHost);
  printf("%-34s %.4f ms %6.0f GB/s  max rel err of Phi on [-12, 8]: %.2e\n", name, med,
         4.0 * n / med / 1e6, e);
}

__global__ void fill(bf* p, long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    unsigned h = (unsigned)(i * 2654435761u);
    p[i] = __float2bfloat16(((h >> 8) * (1.f / 16777216.f) - 0.5f) * 8.f);
  }
}

int main() {
  const long long n = 16384LL * 14336;
  bf *in, *out;
  double* derr;
  cudaMalloc(&in, n * 2);
  cudaMalloc(&out, n * 2);
  cudaMalloc(&derr, 8);
  fill<<<(unsigned)((n + 255) / 256), 256>>>(in, n);
  for (int rep = 0; rep < 2; ++rep) {
    run<0>("0.5 (1 + erff)   (eager's)", in, out, n, derr);
    run<1>("0.5 erfcf(-x/sqrt2) (committed)", in, out, n, derr);
    run<2>("normcdff", in, out, n, derr);
    run<3>("erfcf(|x|/sqrt2) + select", in, out, n, derr);
    run<4>("erff above -1, erfcf below", in, out, n, derr);
  }
  return 0;
}
