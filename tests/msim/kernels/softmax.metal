// Row softmax in the style of MLX's looped kernel: N_READS-wide loads, simd_max/simd_sum,
// a threadgroup scratch broadcast, fast::exp, float accumulation for half/bfloat inputs.
#include <metal_stdlib>
using namespace metal;

#define METAL_FUNC inline __attribute__((__always_inline__))
static constant constexpr int N_READS = 4;

template <typename T>
METAL_FUNC float threadgroup_reduce(float v, threadgroup float* scratch, uint lane, uint sg,
                                    uint n_sg, bool is_max) {
  v = is_max ? simd_max(v) : simd_sum(v);
  if (lane == 0) scratch[sg] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float init = is_max ? -numeric_limits<float>::infinity() : 0.0f;
  float r = lane < n_sg ? scratch[lane] : init;
  r = is_max ? simd_max(r) : simd_sum(r);
  threadgroup_barrier(mem_flags::mem_threadgroup);  // scratch is reused by the next reduction
  return r;
}

template <typename T>
[[kernel]] void softmax_looped(const device T* in [[buffer(0)]], device T* out [[buffer(1)]],
                               constant int& axis_size [[buffer(2)]],
                               uint gid [[threadgroup_position_in_grid]],
                               uint lid [[thread_position_in_threadgroup]],
                               uint lsize [[threads_per_threadgroup]],
                               uint lane [[thread_index_in_simdgroup]],
                               uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float scratch[32];
  const uint n_sg = (lsize + 31) / 32;
  in += gid * size_t(axis_size);
  out += gid * size_t(axis_size);
  float maxval = -numeric_limits<float>::infinity();
  for (int r = 0; r < axis_size; r += lsize * N_READS) {
    for (int i = 0; i < N_READS; i++) {
      int idx = r + lid * N_READS + i;
      if (idx < axis_size) maxval = max(maxval, float(in[idx]));
    }
  }
  maxval = threadgroup_reduce<T>(maxval, scratch, lane, sg, n_sg, true);
  float normalizer = 0;
  for (int r = 0; r < axis_size; r += lsize * N_READS) {
    for (int i = 0; i < N_READS; i++) {
      int idx = r + lid * N_READS + i;
      if (idx < axis_size) normalizer += fast::exp(float(in[idx]) - maxval);
    }
  }
  normalizer = 1.0f / threadgroup_reduce<T>(normalizer, scratch, lane, sg, n_sg, false);
  for (int r = 0; r < axis_size; r += lsize * N_READS) {
    for (int i = 0; i < N_READS; i++) {
      int idx = r + lid * N_READS + i;
      if (idx < axis_size) out[idx] = T(fast::exp(float(in[idx]) - maxval) * normalizer);
    }
  }
}

#define instantiate_softmax(name, T)                                                       \
  template [[host_name("softmax_looped_" #name)]] [[kernel]] void softmax_looped<T>(       \
      const device T* in [[buffer(0)]], device T* out [[buffer(1)]],                       \
      constant int& axis_size [[buffer(2)]], uint gid [[threadgroup_position_in_grid]],    \
      uint lid [[thread_position_in_threadgroup]], uint lsize [[threads_per_threadgroup]], \
      uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]]);
instantiate_softmax(float32, float) instantiate_softmax(float16, half)
    instantiate_softmax(bfloat16, bfloat)
