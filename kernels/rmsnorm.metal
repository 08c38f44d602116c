// RMSNorm (+ fused residual add) forward and backward. One threadgroup per row (forward) or per
// block of rows (backward); float accumulation for every dtype; two-level simd_sum reductions.
// Thread t owns elements t, t + tpg, t + 2 tpg, ...: each load instruction is coalesced across a
// simdgroup without requiring 16-byte alignment of offset views.
#include <metal_stdlib>

#include "common/utils.h"
#include "rmsnorm.h"

using namespace metal;
using metalcore::threadgroup_sum;
using metalcore::rmsnorm_k::kHasResidual;
using metalcore::rmsnorm_k::kHasWeight;
using metalcore::rmsnorm_k::kReads;
using metalcore::rmsnorm_k::Params;

// h = x (+ residual, rounded to T once as unfused code would; written to residual_out).
template <typename T>
inline float load_input(device const T* x, device const T* r, device T* h, uint j, bool add) {
  if (!add) return float(x[j]);
  const T s = T(float(x[j]) + float(r[j]));
  h[j] = s;
  return float(s);
}

// Forward, register-resident: the row is read once (n <= kReads * threads_per_threadgroup).
template <typename T>
[[kernel]] void rmsnorm_single(
    device const T* x [[buffer(0)]], device const T* residual [[buffer(1)]],
    device const T* weight [[buffer(2)]], device T* out [[buffer(3)]],
    device T* residual_out [[buffer(4)]], constant Params& p [[buffer(5)]],
    uint row [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]], uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]], uint n_sg [[simdgroups_per_threadgroup]]) {
  threadgroup float scratch[32];
  const bool add = (p.flags & kHasResidual) != 0;
  const bool has_w = (p.flags & kHasWeight) != 0;
  x += ulong(row) * p.x_stride;
  residual += add ? ulong(row) * p.r_stride : 0;
  out += ulong(row) * p.n;
  residual_out += add ? ulong(row) * p.n : 0;

  float v[kReads];
  float ss = 0.0f;
  for (uint k = 0; k < kReads; ++k) {
    const uint j = tid + k * tpg;
    v[k] = j < p.n ? load_input(x, residual, residual_out, j, add) : 0.0f;
    ss += v[k] * v[k];
  }
  ss = threadgroup_sum(ss, scratch, lane, sg, n_sg);
  const float rstd = precise::rsqrt(ss / float(p.n) + p.eps);
  for (uint k = 0; k < kReads; ++k) {
    const uint j = tid + k * tpg;
    if (j < p.n) out[j] = T(v[k] * rstd * (has_w ? float(weight[j]) : 1.0f));
  }
}

// Forward for long rows: a strided loop; the second pass re-reads the row (mostly from cache).
template <typename T>
[[kernel]] void rmsnorm_looped(
    device const T* x [[buffer(0)]], device const T* residual [[buffer(1)]],
    device const T* weight [[buffer(2)]], device T* out [[buffer(3)]],
    device T* residual_out [[buffer(4)]], constant Params& p [[buffer(5)]],
    uint row [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]], uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]], uint n_sg [[simdgroups_per_threadgroup]]) {
  threadgroup float scratch[32];
  const bool add = (p.flags & kHasResidual) != 0;
  const bool has_w = (p.flags & kHasWeight) != 0;
  x += ulong(row) * p.x_stride;
  residual += add ? ulong(row) * p.r_stride : 0;
  out += ulong(row) * p.n;
  residual_out += add ? ulong(row) * p.n : 0;

  float ss = 0.0f;
  for (uint j = tid; j < p.n; j += tpg) {
    const float h = load_input(x, residual, residual_out, j, add);
    ss += h * h;
  }
  ss = threadgroup_sum(ss, scratch, lane, sg, n_sg);
  const float rstd = precise::rsqrt(ss / float(p.n) + p.eps);
  // The fused variant re-reads the rounded sum this same thread wrote (no cross-thread hazard).
  device const T* src = add ? residual_out : x;
  for (uint j = tid; j < p.n; j += tpg) {
    out[j] = T(float(src[j]) * rstd * (has_w ? float(weight[j]) : 1.0f));
  }
}

// Backward, register-resident: threadgroup `group` handles rows_per_group consecutive rows;
// x, grad_out and weight are read once, and the dweight partials stay in registers until the end.
//   dx = rstd * (g w) - x * rstd^3 * mean(g w x) (+ grad_residual);  dw += g * x * rstd
template <typename T>
[[kernel]] void rmsnorm_bwd_single(
    device const T* grad_out [[buffer(0)]], device const T* x [[buffer(1)]],
    device const T* weight [[buffer(2)]], device const T* grad_residual [[buffer(3)]],
    device T* grad_input [[buffer(4)]], device float* dw_partial [[buffer(5)]],
    constant Params& p [[buffer(6)]], uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]], uint tpg [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]],
    uint n_sg [[simdgroups_per_threadgroup]]) {
  threadgroup float2 scratch[32];
  const bool has_w = (p.flags & kHasWeight) != 0;
  const bool add = (p.flags & kHasResidual) != 0;
  const float inv_n = 1.0f / float(p.n);
  float w[kReads], dw[kReads];
  for (uint k = 0; k < kReads; ++k) {
    const uint j = tid + k * tpg;
    w[k] = has_w && j < p.n ? float(weight[j]) : 1.0f;
    dw[k] = 0.0f;
  }
  const uint row_begin = group * p.rows_per_group;
  const uint row_end = min(p.rows, row_begin + p.rows_per_group);
  for (uint row = row_begin; row < row_end; ++row) {
    device const T* xr = x + ulong(row) * p.x_stride;
    device const T* gr = grad_out + ulong(row) * p.g_stride;
    float xv[kReads], gv[kReads];
    float2 acc = 0.0f;  // (sum x^2, sum g w x)
    for (uint k = 0; k < kReads; ++k) {
      const uint j = tid + k * tpg;
      xv[k] = j < p.n ? float(xr[j]) : 0.0f;
      gv[k] = j < p.n ? float(gr[j]) : 0.0f;
      acc += float2(xv[k] * xv[k], gv[k] * w[k] * xv[k]);
    }
    acc = threadgroup_sum(acc, scratch, lane, sg, n_sg);
    const float rstd = precise::rsqrt(acc.x * inv_n + p.eps);
    const float coef = acc.y * rstd * rstd * rstd * inv_n;
    device T* dxr = grad_input + ulong(row) * p.n;
    device const T* grr = grad_residual + (add ? ulong(row) * p.r_stride : 0);
    for (uint k = 0; k < kReads; ++k) {
      const uint j = tid + k * tpg;
      if (j < p.n) {
        const float d = gv[k] * w[k] * rstd - xv[k] * coef;
        dxr[j] = T(add ? d + float(grr[j]) : d);
        dw[k] += gv[k] * xv[k] * rstd;
      }
    }
  }
  if (has_w) {
    device float* part = dw_partial + ulong(group) * p.n;
    for (uint k = 0; k < kReads; ++k) {
      const uint j = tid + k * tpg;
      if (j < p.n) part[j] = dw[k];
    }
  }
}

// Backward for long rows: two passes per row; each thread accumulates the dweight partials of
// its own columns in this threadgroup's row of dw_partial (no other thread touches them).
template <typename T>
[[kernel]] void rmsnorm_bwd_looped(
    device const T* grad_out [[buffer(0)]], device const T* x [[buffer(1)]],
    device const T* weight [[buffer(2)]], device const T* grad_residual [[buffer(3)]],
    device T* grad_input [[buffer(4)]], device float* dw_partial [[buffer(5)]],
    constant Params& p [[buffer(6)]], uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]], uint tpg [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]],
    uint n_sg [[simdgroups_per_threadgroup]]) {
  threadgroup float2 scratch[32];
  const bool has_w = (p.flags & kHasWeight) != 0;
  const bool add = (p.flags & kHasResidual) != 0;
  const float inv_n = 1.0f / float(p.n);
  device float* part = dw_partial + ulong(group) * p.n;
  if (has_w) {
    for (uint j = tid; j < p.n; j += tpg) part[j] = 0.0f;
  }
  const uint row_begin = group * p.rows_per_group;
  const uint row_end = min(p.rows, row_begin + p.rows_per_group);
  for (uint row = row_begin; row < row_end; ++row) {
    device const T* xr = x + ulong(row) * p.x_stride;
    device const T* gr = grad_out + ulong(row) * p.g_stride;
    float2 acc = 0.0f;
    for (uint j = tid; j < p.n; j += tpg) {
      const float xv = float(xr[j]);
      const float gw = float(gr[j]) * (has_w ? float(weight[j]) : 1.0f);
      acc += float2(xv * xv, gw * xv);
    }
    acc = threadgroup_sum(acc, scratch, lane, sg, n_sg);
    const float rstd = precise::rsqrt(acc.x * inv_n + p.eps);
    const float coef = acc.y * rstd * rstd * rstd * inv_n;
    device T* dxr = grad_input + ulong(row) * p.n;
    device const T* grr = grad_residual + (add ? ulong(row) * p.r_stride : 0);
    for (uint j = tid; j < p.n; j += tpg) {
      const float xv = float(xr[j]);
      const float g = float(gr[j]);
      const float d = g * (has_w ? float(weight[j]) : 1.0f) * rstd - xv * coef;
      dxr[j] = T(add ? d + float(grr[j]) : d);
      if (has_w) part[j] += g * xv * rstd;
    }
  }
}

// dweight[j] = sum over groups of dw_partial[group][j], one thread per column.
template <typename T>
[[kernel]] void rmsnorm_dw_reduce(device const float* dw_partial [[buffer(0)]],
                                  device T* grad_weight [[buffer(1)]],
                                  constant uint& n [[buffer(2)]],
                                  constant uint& groups [[buffer(3)]],
                                  uint j [[thread_position_in_grid]]) {
  if (j >= n) return;
  float s = 0.0f;
  for (uint g = 0; g < groups; ++g) s += dw_partial[ulong(g) * n + j];
  grad_weight[j] = T(s);
}

#define METALCORE_RMSNORM_FWD(func, variant, T, tok)                                             \
  template [[host_name(METALCORE_HOST_NAME(rmsnorm, variant, tok))]] [[kernel]] void func<T>(    \
      device const T*, device const T*, device const T*, device T*, device T*, constant Params&, \
      uint, uint, uint, uint, uint, uint);
#define METALCORE_RMSNORM_BWD(func, variant, T, tok)                                          \
  template [[host_name(METALCORE_HOST_NAME(rmsnorm, variant, tok))]] [[kernel]] void func<T>( \
      device const T*, device const T*, device const T*, device const T*, device T*,          \
      device float*, constant Params&, uint, uint, uint, uint, uint, uint);
#define METALCORE_RMSNORM_INSTANTIATE(T, tok)                                          \
  METALCORE_RMSNORM_FWD(rmsnorm_single, single, T, tok)                                \
  METALCORE_RMSNORM_FWD(rmsnorm_looped, looped, T, tok)                                \
  METALCORE_RMSNORM_BWD(rmsnorm_bwd_single, bwd_single, T, tok)                        \
  METALCORE_RMSNORM_BWD(rmsnorm_bwd_looped, bwd_looped, T, tok)                        \
  template [[host_name(METALCORE_HOST_NAME(rmsnorm, dw_reduce, tok))]] [[kernel]] void \
  rmsnorm_dw_reduce<T>(device const float*, device T*, constant uint&, constant uint&, uint);

METALCORE_FOR_EACH_FLOAT(METALCORE_RMSNORM_INSTANTIATE)
