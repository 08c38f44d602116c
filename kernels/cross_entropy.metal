// Cross-entropy forward and backward over class-index targets, float accumulation for every
// dtype. One threadgroup per row: a max pass, then a pass summing exp(x - max) (and x, for
// label smoothing), then the forward writes the row's loss and the backward writes the row's
// gradient; re-reads hit the cache. Ignored rows write 0.
#include <metal_stdlib>

#include "common/utils.h"
#include "cross_entropy.h"
#include "softmax.h"

using namespace metal;
using metalcore::threadgroup_max;
using metalcore::threadgroup_sum;
using metalcore::cross_entropy_k::Params;

template <typename T>
[[kernel]] void ce_fwd(device const T* x [[buffer(0)]], device const long* target [[buffer(1)]],
                       device float* losses [[buffer(2)]], constant Params& p [[buffer(3)]],
                       uint row [[threadgroup_position_in_grid]],
                       uint tid [[thread_index_in_threadgroup]],
                       uint tpg [[threads_per_threadgroup]],
                       uint lane [[thread_index_in_simdgroup]],
                       uint sg [[simdgroup_index_in_threadgroup]],
                       uint n_sg [[simdgroups_per_threadgroup]]) {
  threadgroup float scratch[32];
  threadgroup float2 scratch2[32];
  const long t = target[row];
  if (t == long(p.ignore_index)) {
    if (tid == 0) losses[row] = 0.0f;
    return;
  }
  device const T* xr = x + ulong(row) * p.x_stride;
  float m = -INFINITY;
  for (uint j = tid; j < p.n; j += tpg) m = max(m, float(xr[j]));
  m = threadgroup_max(m, scratch, lane, sg, n_sg);
  float2 acc = 0.0f;  // (sum exp(x - max), sum x)
  for (uint j = tid; j < p.n; j += tpg) {
    const float v = float(xr[j]);
    acc += float2(precise::exp(v - m), v);
  }
  acc = threadgroup_sum(acc, scratch2, lane, sg, n_sg);
  if (tid != 0) return;
  // log(sum) + (max - x_t): a large max cannot swallow log(sum) before the difference.
  const float log_sum = precise::log(acc.x);
  float loss = (1.0f - p.smoothing) * (log_sum + (m - float(xr[t])));
  if (p.smoothing > 0.0f) loss += p.smoothing * (log_sum + (m - acc.y / float(p.n)));
  losses[row] = loss;
}

// grad[row, j] = scale[row] (softmax_j - (1 - eps) [j == t] - eps / C).
template <typename T>
[[kernel]] void ce_bwd(device const float* scale [[buffer(0)]], device const T* x [[buffer(1)]],
                       device const long* target [[buffer(2)]], device T* grad [[buffer(3)]],
                       constant Params& p [[buffer(4)]], uint row [[threadgroup_position_in_grid]],
                       uint tid [[thread_index_in_threadgroup]],
                       uint tpg [[threads_per_threadgroup]],
                       uint lane [[thread_index_in_simdgroup]],
                       uint sg [[simdgroup_index_in_threadgroup]],
                       uint n_sg [[simdgroups_per_threadgroup]]) {
  threadgroup float scratch[32];
  const long t = target[row];
  device T* gr = grad + ulong(row) * p.n;
  if (t == long(p.ignore_index)) {
    for (uint j = tid; j < p.n; j += tpg) gr[j] = T(0.0f);
    return;
  }
  device const T* xr = x + ulong(row) * p.x_stride;
  float m = -INFINITY;
  for (uint j = tid; j < p.n; j += tpg) m = max(m, float(xr[j]));
  m = threadgroup_max(m, scratch, lane, sg, n_sg);
  float s = 0.0f;
  for (uint j = tid; j < p.n; j += tpg) s += precise::exp(float(xr[j]) - m);
  s = threadgroup_sum(s, scratch, lane, sg, n_sg);
  const float sc = scale[row];
  // (softmax - (1 - eps) onehot - eps / C) * scale, the scale last as in the formula.
  const float inv = 1.0f / s, u = p.smoothing / float(p.n), on = 1.0f - p.smoothing;
  for (uint j = tid; j < p.n; j += tpg) {
    const float pj = precise::exp(float(xr[j]) - m) * inv;
    gr[j] = T((pj - (long(j) == t ? on : 0.0f) - u) * sc);
  }
}

#define METALCORE_CROSS_ENTROPY_INSTANTIATE(T, tok)                                                \
  template [[host_name(METALCORE_HOST_NAME(cross_entropy, fwd, tok))]] [[kernel]] void ce_fwd<T>(  \
      device const T*, device const long*, device float*, constant Params&, uint, uint, uint,      \
      uint, uint, uint);                                                                           \
  template [[host_name(METALCORE_HOST_NAME(cross_entropy, bwd, tok))]] [[kernel]] void ce_bwd<T>(  \
      device const float*, device const T*, device const long*, device T*, constant Params&, uint, \
      uint, uint, uint, uint, uint);

METALCORE_FOR_EACH_FLOAT(METALCORE_CROSS_ENTROPY_INSTANTIATE)
