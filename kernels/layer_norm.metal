// LayerNorm (+ fused residual add) forward and backward. One threadgroup per row (forward) or per
// block of rows (backward), threads striding over the row (consecutive lanes read consecutive
// elements, so loads coalesce); float accumulation for every dtype; two-level simd_sum
// reductions. Statistics are two-pass with the corrected variance: mean0 first, then over
// d = x - mean0 the sums of d and d^2 (mean = mean0 + sum(d)/n, var = sum(d^2)/n - (sum(d)/n)^2),
// never E[x^2] - E[x]^2. Later passes re-read the row, mostly from cache.
#include <metal_stdlib>

#include "common/utils.h"
#include "layer_norm.h"

using namespace metal;
using metalcore::threadgroup_sum;
using metalcore::layer_norm_k::kHasBias;
using metalcore::layer_norm_k::kHasResidual;
using metalcore::layer_norm_k::kHasWeight;
using metalcore::layer_norm_k::Params;

// mean0 of row r (n elements) and the corrected (mean, rstd), reading r twice.
template <typename T>
inline float2 row_stats(device const T* r, uint n, float eps, threadgroup float* s1,
                        threadgroup float2* s2, uint tid, uint tpg, uint lane, uint sg, uint n_sg) {
  float s = 0.0f;
  for (uint j = tid; j < n; j += tpg) s += float(r[j]);
  const float mean0 = threadgroup_sum(s, s1, lane, sg, n_sg) / float(n);
  float2 acc = 0.0f;  // (sum d, sum d^2)
  for (uint j = tid; j < n; j += tpg) {
    const float d = float(r[j]) - mean0;
    acc += float2(d, d * d);
  }
  acc = threadgroup_sum(acc, s2, lane, sg, n_sg);
  const float delta = acc.x / float(n);
  const float var = max(acc.y / float(n) - delta * delta, 0.0f);
  return float2(mean0 + delta, precise::rsqrt(var + eps));
}

template <typename T>
[[kernel]] void layer_norm_fwd(
    device const T* x [[buffer(0)]], device const T* residual [[buffer(1)]],
    device const T* weight [[buffer(2)]], device const T* bias [[buffer(3)]],
    device T* out [[buffer(4)]], device T* residual_out [[buffer(5)]],
    constant Params& p [[buffer(6)]], uint row [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]], uint tpg [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]],
    uint n_sg [[simdgroups_per_threadgroup]]) {
  threadgroup float s1[32];
  threadgroup float2 s2[32];
  const bool add = (p.flags & kHasResidual) != 0;
  const bool has_w = (p.flags & kHasWeight) != 0;
  const bool has_b = (p.flags & kHasBias) != 0;
  x += ulong(row) * p.x_stride;
  out += ulong(row) * p.n;
  device const T* src = x;
  if (add) {
    // The sum is rounded to T once, as unfused code would. Every later loop gives thread tid
    // the same columns, so each thread re-reads only what it wrote itself (no barrier needed).
    residual += ulong(row) * p.r_stride;
    residual_out += ulong(row) * p.n;
    for (uint j = tid; j < p.n; j += tpg) residual_out[j] = T(float(x[j]) + float(residual[j]));
    src = residual_out;
  }
  const float2 st = row_stats(src, p.n, p.eps, s1, s2, tid, tpg, lane, sg, n_sg);
  for (uint j = tid; j < p.n; j += tpg) {
    float y = (float(src[j]) - st.x) * st.y;
    if (has_w) y *= float(weight[j]);
    if (has_b) y += float(bias[j]);
    out[j] = T(y);
  }
}

// Backward: threadgroup `group` handles rows_per_group consecutive rows; each thread accumulates
// the dweight / dbias partials of its own columns in this threadgroup's rows of the partial
// buffers (no other thread touches them, so no barrier guards them).
//   dx = rstd * (g w - mean(g w)) - (x - mean) * rstd^3 * mean(g w (x - mean)) (+ grad_residual)
template <typename T>
[[kernel]] void layer_norm_bwd(
    device const T* grad_out [[buffer(0)]], device const T* x [[buffer(1)]],
    device const T* weight [[buffer(2)]], device const T* grad_residual [[buffer(3)]],
    device T* grad_input [[buffer(4)]], device float* dw_partial [[buffer(5)]],
    device float* db_partial [[buffer(6)]], constant Params& p [[buffer(7)]],
    uint group [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]], uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]], uint n_sg [[simdgroups_per_threadgroup]]) {
  threadgroup float s1[32];
  threadgroup float4 s4[32];
  const bool has_w = (p.flags & kHasWeight) != 0;
  const bool want_b = (p.flags & kHasBias) != 0;
  const bool add = (p.flags & kHasResidual) != 0;
  const float nf = float(p.n);
  device float* dw = dw_partial + ulong(group) * p.n;
  device float* db = db_partial + ulong(group) * p.n;
  for (uint j = tid; j < p.n; j += tpg) {
    if (has_w) dw[j] = 0.0f;
    if (want_b) db[j] = 0.0f;
  }
  const uint row_begin = group * p.rows_per_group;
  const uint row_end = min(p.rows, row_begin + p.rows_per_group);
  for (uint row = row_begin; row < row_end; ++row) {
    device const T* xr = x + ulong(row) * p.x_stride;
    device const T* gr = grad_out + ulong(row) * p.g_stride;
    float s = 0.0f;
    for (uint j = tid; j < p.n; j += tpg) s += float(xr[j]);
    const float mean0 = threadgroup_sum(s, s1, lane, sg, n_sg) / nf;
    float4 acc = 0.0f;  // (sum d, sum d^2, sum g w, sum g w d) with d = x - mean0
    for (uint j = tid; j < p.n; j += tpg) {
      const float d = float(xr[j]) - mean0;
      const float gw = float(gr[j]) * (has_w ? float(weight[j]) : 1.0f);
      acc += float4(d, d * d, gw, gw * d);
    }
    acc = threadgroup_sum(acc, s4, lane, sg, n_sg);
    const float delta = acc.x / nf;
    const float var = max(acc.y / nf - delta * delta, 0.0f);
    const float rstd = precise::rsqrt(var + p.eps);
    // sum g w (x - mean) = sum g w d - delta sum g w (skipped for an infinite sum g w, where it
    // would turn inf into inf - inf; it is a rounding-sized term).
    const float dot = isfinite(acc.z) ? acc.w - delta * acc.z : acc.w;
    const float mean = mean0 + delta, mean_gw = acc.z / nf;
    const float coef = dot * rstd * rstd * rstd / nf;
    device T* dxr = grad_input + ulong(row) * p.n;
    device const T* grr = grad_residual + (add ? ulong(row) * p.r_stride : 0);
    for (uint j = tid; j < p.n; j += tpg) {
      const float xc = float(xr[j]) - mean;
      const float g = float(gr[j]);
      const float gw = g * (has_w ? float(weight[j]) : 1.0f);
      float d = (gw - mean_gw) * rstd - xc * coef;
      if (add) d += float(grr[j]);
      dxr[j] = T(d);
      if (has_w) dw[j] += g * (xc * rstd);
      if (want_b) db[j] += g;
    }
  }
}

// param[j] = sum over groups of partial[group][j], one thread per column (dweight and dbias).
template <typename T>
[[kernel]] void layer_norm_param_reduce(device const float* partial [[buffer(0)]],
                                        device T* param_grad [[buffer(1)]],
                                        constant uint& n [[buffer(2)]],
                                        constant uint& groups [[buffer(3)]],
                                        uint j [[thread_position_in_grid]]) {
  if (j >= n) return;
  float s = 0.0f;
  for (uint g = 0; g < groups; ++g) s += partial[ulong(g) * n + j];
  param_grad[j] = T(s);
}

#define METALCORE_LAYER_NORM_INSTANTIATE(T, tok)                                                   \
  template [[host_name(METALCORE_HOST_NAME(layer_norm, fwd, tok))]] [[kernel]] void                \
  layer_norm_fwd<T>(device const T*, device const T*, device const T*, device const T*, device T*, \
                    device T*, constant Params&, uint, uint, uint, uint, uint, uint);              \
  template [[host_name(METALCORE_HOST_NAME(layer_norm, bwd, tok))]] [[kernel]] void                \
  layer_norm_bwd<T>(device const T*, device const T*, device const T*, device const T*, device T*, \
                    device float*, device float*, constant Params&, uint, uint, uint, uint, uint,  \
                    uint);                                                                         \
  template [[host_name(METALCORE_HOST_NAME(layer_norm, param_reduce, tok))]] [[kernel]] void       \
  layer_norm_param_reduce<T>(device const float*, device T*, constant uint&, constant uint&,       \
                             uint);

METALCORE_FOR_EACH_FLOAT(METALCORE_LAYER_NORM_INSTANTIATE)
