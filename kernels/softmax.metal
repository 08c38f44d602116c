// Softmax / log_softmax forward and backward, float accumulation for every dtype.
// Rows (inner == 1): one threadgroup per row, three strided passes (max, sum of exp, write) with
// threadgroup reductions between them; the row's re-reads hit the cache. Columns (inner > 1): one
// thread per (outer, inner) column, loads coalesced across inner.
#include <metal_stdlib>

#include "common/utils.h"
#include "softmax.h"

using namespace metal;
using metalcore::threadgroup_max;
using metalcore::threadgroup_sum;
using metalcore::softmax_k::Params;

template <typename T>
[[kernel]] void softmax_rows(
    device const T* x [[buffer(0)]], device T* y [[buffer(1)]], constant Params& p [[buffer(2)]],
    uint row [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]], uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]], uint n_sg [[simdgroups_per_threadgroup]]) {
  threadgroup float scratch[32];
  const uint n = uint(p.n);
  device const T* xr = x + ulong(row) * n;
  device T* yr = y + ulong(row) * n;
  // A NaN element makes the sum NaN below, whatever max keeps: the whole row is NaN, as in torch.
  float m = -INFINITY;
  for (uint j = tid; j < n; j += tpg) m = max(m, float(xr[j]));
  m = threadgroup_max(m, scratch, lane, sg, n_sg);
  float s = 0.0f;
  for (uint j = tid; j < n; j += tpg) s += precise::exp(float(xr[j]) - m);
  s = threadgroup_sum(s, scratch, lane, sg, n_sg);
  const float ls = precise::log(s), inv = 1.0f / s;
  for (uint j = tid; j < n; j += tpg) {
    const float d = float(xr[j]) - m;
    yr[j] = T(p.log != 0 ? d - ls : precise::exp(d) * inv);
  }
}

template <typename T>
[[kernel]] void softmax_columns(device const T* x [[buffer(0)]], device T* y [[buffer(1)]],
                                constant Params& p [[buffer(2)]],
                                uint col [[thread_position_in_grid]]) {
  if (ulong(col) >= p.outer * p.inner) return;
  const ulong base = (ulong(col) / p.inner) * p.n * p.inner + ulong(col) % p.inner;
  float m = -INFINITY;
  for (ulong k = 0; k < p.n; ++k) m = max(m, float(x[base + k * p.inner]));
  float s = 0.0f;
  for (ulong k = 0; k < p.n; ++k) s += precise::exp(float(x[base + k * p.inner]) - m);
  const float ls = precise::log(s), inv = 1.0f / s;
  for (ulong k = 0; k < p.n; ++k) {
    const float d = float(x[base + k * p.inner]) - m;
    y[base + k * p.inner] = T(p.log != 0 ? d - ls : precise::exp(d) * inv);
  }
}

// softmax: dx = y (g - sum(g y)); log_softmax: dx = g - exp(y) sum(g).
template <typename T>
[[kernel]] void softmax_bwd_rows(device const T* g [[buffer(0)]], device const T* y [[buffer(1)]],
                                 device T* dx [[buffer(2)]], constant Params& p [[buffer(3)]],
                                 uint row [[threadgroup_position_in_grid]],
                                 uint tid [[thread_index_in_threadgroup]],
                                 uint tpg [[threads_per_threadgroup]],
                                 uint lane [[thread_index_in_simdgroup]],
                                 uint sg [[simdgroup_index_in_threadgroup]],
                                 uint n_sg [[simdgroups_per_threadgroup]]) {
  threadgroup float scratch[32];
  const uint n = uint(p.n);
  const ulong off = ulong(row) * n;
  const bool log = p.log != 0;
  float s = 0.0f;
  for (uint j = tid; j < n; j += tpg)
    s += log ? float(g[off + j]) : float(g[off + j]) * float(y[off + j]);
  s = threadgroup_sum(s, scratch, lane, sg, n_sg);
  for (uint j = tid; j < n; j += tpg) {
    const float gj = float(g[off + j]), yj = float(y[off + j]);
    dx[off + j] = T(log ? gj - precise::exp(yj) * s : yj * (gj - s));
  }
}

template <typename T>
[[kernel]] void softmax_bwd_columns(device const T* g [[buffer(0)]],
                                    device const T* y [[buffer(1)]], device T* dx [[buffer(2)]],
                                    constant Params& p [[buffer(3)]],
                                    uint col [[thread_position_in_grid]]) {
  if (ulong(col) >= p.outer * p.inner) return;
  const ulong base = (ulong(col) / p.inner) * p.n * p.inner + ulong(col) % p.inner;
  const bool log = p.log != 0;
  float s = 0.0f;
  for (ulong k = 0; k < p.n; ++k) {
    const ulong i = base + k * p.inner;
    s += log ? float(g[i]) : float(g[i]) * float(y[i]);
  }
  for (ulong k = 0; k < p.n; ++k) {
    const ulong i = base + k * p.inner;
    const float gk = float(g[i]), yk = float(y[i]);
    dx[i] = T(log ? gk - precise::exp(yk) * s : yk * (gk - s));
  }
}

#define METALCORE_SOFTMAX_INSTANTIATE(T, tok)                                                      \
  template [[host_name(METALCORE_HOST_NAME(softmax, rows, tok))]] [[kernel]] void softmax_rows<T>( \
      device const T*, device T*, constant Params&, uint, uint, uint, uint, uint, uint);           \
  template [[host_name(METALCORE_HOST_NAME(softmax, columns, tok))]] [[kernel]] void               \
  softmax_columns<T>(device const T*, device T*, constant Params&, uint);                          \
  template [[host_name(METALCORE_HOST_NAME(softmax, bwd_rows, tok))]] [[kernel]] void              \
  softmax_bwd_rows<T>(device const T*, device const T*, device T*, constant Params&, uint, uint,   \
                      uint, uint, uint, uint);                                                     \
  template [[host_name(METALCORE_HOST_NAME(softmax, bwd_columns, tok))]] [[kernel]] void           \
  softmax_bwd_columns<T>(device const T*, device const T*, device T*, constant Params&, uint);

METALCORE_FOR_EACH_FLOAT(METALCORE_SOFTMAX_INSTANTIATE)
