// RMSNorm (+ fused residual add) forward and backward. One threadgroup per row (forward) or per
// block of rows (backward); float accumulation for every dtype; two-level simd_sum reductions.
// Thread t owns the W-element groups starting at W (t + g tpg): consecutive lanes read
// consecutive groups, so every load instruction is coalesced across a simdgroup. W = 4 (vec4
// loads) when every row is 4-element aligned, else W = 1 (offset views of any alignment).
#include <metal_stdlib>

#include "common/utils.h"
#include "rmsnorm.h"

using namespace metal;
using metalcore::threadgroup_sum;
using metalcore::rmsnorm_k::kHasResidual;
using metalcore::rmsnorm_k::kHasWeight;
using metalcore::rmsnorm_k::kReads;
using metalcore::rmsnorm_k::Params;

// Loads/stores W consecutive elements as floats; the caller guarantees W-element alignment.
template <typename T, uint W>
struct Io;
template <typename T>
struct Io<T, 1> {
  static void load(device const T* p, thread float* v) { v[0] = float(p[0]); }
  static void store(device T* p, thread const float* v) { p[0] = T(v[0]); }
};
template <typename T>
struct Io<T, 4> {
  static void load(device const T* p, thread float* v) {
    const vec<T, 4> q = *reinterpret_cast<device const vec<T, 4>*>(p);
    v[0] = float(q.x);
    v[1] = float(q.y);
    v[2] = float(q.z);
    v[3] = float(q.w);
  }
  static void store(device T* p, thread const float* v) {
    *reinterpret_cast<device vec<T, 4>*>(p) = vec<T, 4>(T(v[0]), T(v[1]), T(v[2]), T(v[3]));
  }
};

// v = x (+ residual, rounded to T once as unfused code would, and written to residual_out).
template <typename T, uint W>
inline void load_input(device const T* x, device const T* r, device T* h, uint j, bool add,
                       thread float* v) {
  Io<T, W>::load(x + j, v);
  if (!add) return;
  float rv[W];
  Io<T, W>::load(r + j, rv);
  for (uint i = 0; i < W; ++i) v[i] = float(T(v[i] + rv[i]));
  Io<T, W>::store(h + j, v);
}

template <typename T, uint W>
inline void load_weight(device const T* w, uint j, bool has_w, thread float* v) {
  if (has_w) {
    Io<T, W>::load(w + j, v);
  } else {
    for (uint i = 0; i < W; ++i) v[i] = 1.0f;
  }
}

// Forward, register-resident: the row is read once (n <= kReads * threads_per_threadgroup).
template <typename T, uint W>
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
  for (uint g = 0; g < kReads / W; ++g) {
    const uint j = W * (tid + g * tpg);
    thread float* vg = v + g * W;
    if (j < p.n) {
      load_input<T, W>(x, residual, residual_out, j, add, vg);
    } else {
      for (uint i = 0; i < W; ++i) vg[i] = 0.0f;
    }
    for (uint i = 0; i < W; ++i) ss += vg[i] * vg[i];
  }
  ss = threadgroup_sum(ss, scratch, lane, sg, n_sg);
  const float rstd = precise::rsqrt(ss / float(p.n) + p.eps);
  for (uint g = 0; g < kReads / W; ++g) {
    const uint j = W * (tid + g * tpg);
    if (j >= p.n) continue;
    float w[W], o[W];
    load_weight<T, W>(weight, j, has_w, w);
    for (uint i = 0; i < W; ++i) o[i] = v[g * W + i] * rstd * w[i];
    Io<T, W>::store(out + j, o);
  }
}

// Forward for long rows: a strided loop; the second pass re-reads the row (mostly from cache).
template <typename T, uint W>
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
  for (uint j = W * tid; j < p.n; j += W * tpg) {
    float h[W];
    load_input<T, W>(x, residual, residual_out, j, add, h);
    for (uint i = 0; i < W; ++i) ss += h[i] * h[i];
  }
  ss = threadgroup_sum(ss, scratch, lane, sg, n_sg);
  const float rstd = precise::rsqrt(ss / float(p.n) + p.eps);
  // The fused variant re-reads the rounded sum this same thread wrote (no cross-thread hazard).
  device const T* src = add ? residual_out : x;
  for (uint j = W * tid; j < p.n; j += W * tpg) {
    float v[W], w[W];
    Io<T, W>::load(src + j, v);
    load_weight<T, W>(weight, j, has_w, w);
    for (uint i = 0; i < W; ++i) v[i] *= rstd * w[i];
    Io<T, W>::store(out + j, v);
  }
}

// Backward, register-resident: threadgroup `group` handles rows_per_group consecutive rows;
// x, grad_out and weight are read once, and the dweight partials stay in registers until the end.
//   dx = rstd * (g w) - x * rstd^3 * mean(g w x) (+ grad_residual);  dw += g * x * rstd
template <typename T, uint W>
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
  for (uint g = 0; g < kReads / W; ++g) {
    const uint j = W * (tid + g * tpg);
    thread float* wg = w + g * W;
    if (j < p.n) {
      load_weight<T, W>(weight, j, has_w, wg);
    } else {
      for (uint i = 0; i < W; ++i) wg[i] = 1.0f;
    }
  }
  for (uint k = 0; k < kReads; ++k) dw[k] = 0.0f;
  const uint row_begin = group * p.rows_per_group;
  const uint row_end = min(p.rows, row_begin + p.rows_per_group);
  for (uint row = row_begin; row < row_end; ++row) {
    device const T* xr = x + ulong(row) * p.x_stride;
    device const T* gr = grad_out + ulong(row) * p.g_stride;
    float xv[kReads], gv[kReads];
    float2 acc = 0.0f;  // (sum x^2, sum g w x)
    for (uint g = 0; g < kReads / W; ++g) {
      const uint j = W * (tid + g * tpg);
      thread float* xg = xv + g * W;
      thread float* gg = gv + g * W;
      if (j < p.n) {
        Io<T, W>::load(xr + j, xg);
        Io<T, W>::load(gr + j, gg);
      } else {
        for (uint i = 0; i < W; ++i) xg[i] = gg[i] = 0.0f;
      }
    }
    for (uint k = 0; k < kReads; ++k) acc += float2(xv[k] * xv[k], gv[k] * w[k] * xv[k]);
    acc = threadgroup_sum(acc, scratch, lane, sg, n_sg);
    const float rstd = precise::rsqrt(acc.x * inv_n + p.eps);
    const float coef = acc.y * rstd * rstd * rstd * inv_n;
    device T* dxr = grad_input + ulong(row) * p.n;
    device const T* grr = grad_residual + (add ? ulong(row) * p.r_stride : 0);
    for (uint g = 0; g < kReads / W; ++g) {
      const uint j = W * (tid + g * tpg);
      if (j >= p.n) continue;
      float d[W], r[W];
      if (add) Io<T, W>::load(grr + j, r);
      for (uint i = 0; i < W; ++i) {
        const uint k = g * W + i;
        d[i] = gv[k] * w[k] * rstd - xv[k] * coef + (add ? r[i] : 0.0f);
        dw[k] += gv[k] * xv[k] * rstd;
      }
      Io<T, W>::store(dxr + j, d);
    }
  }
  if (has_w) {
    device float* part = dw_partial + ulong(group) * p.n;
    for (uint g = 0; g < kReads / W; ++g) {
      const uint j = W * (tid + g * tpg);
      if (j < p.n) Io<float, W>::store(part + j, dw + g * W);
    }
  }
}

// Backward for long rows: two passes per row; each thread accumulates the dweight partials of
// its own columns in this threadgroup's row of dw_partial (no other thread touches them).
template <typename T, uint W>
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
  if (has_w) {  // the same W-strided ownership as the accumulation below: no barrier needed
    for (uint j = W * tid; j < p.n; j += W * tpg) {
      for (uint i = 0; i < W; ++i) part[j + i] = 0.0f;
    }
  }
  const uint row_begin = group * p.rows_per_group;
  const uint row_end = min(p.rows, row_begin + p.rows_per_group);
  for (uint row = row_begin; row < row_end; ++row) {
    device const T* xr = x + ulong(row) * p.x_stride;
    device const T* gr = grad_out + ulong(row) * p.g_stride;
    float2 acc = 0.0f;
    for (uint j = W * tid; j < p.n; j += W * tpg) {
      float xv[W], gv[W], w[W];
      Io<T, W>::load(xr + j, xv);
      Io<T, W>::load(gr + j, gv);
      load_weight<T, W>(weight, j, has_w, w);
      for (uint i = 0; i < W; ++i) acc += float2(xv[i] * xv[i], gv[i] * w[i] * xv[i]);
    }
    acc = threadgroup_sum(acc, scratch, lane, sg, n_sg);
    const float rstd = precise::rsqrt(acc.x * inv_n + p.eps);
    const float coef = acc.y * rstd * rstd * rstd * inv_n;
    device T* dxr = grad_input + ulong(row) * p.n;
    device const T* grr = grad_residual + (add ? ulong(row) * p.r_stride : 0);
    for (uint j = W * tid; j < p.n; j += W * tpg) {
      float xv[W], gv[W], w[W], d[W], r[W];
      Io<T, W>::load(xr + j, xv);
      Io<T, W>::load(gr + j, gv);
      load_weight<T, W>(weight, j, has_w, w);
      if (add) Io<T, W>::load(grr + j, r);
      for (uint i = 0; i < W; ++i) d[i] = gv[i] * w[i] * rstd - xv[i] * coef + (add ? r[i] : 0.0f);
      Io<T, W>::store(dxr + j, d);
      if (has_w) {
        for (uint i = 0; i < W; ++i) part[j + i] += gv[i] * xv[i] * rstd;
      }
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

#define METALCORE_RMSNORM_FWD(func, variant, T, W, tok)                                          \
  template [[host_name(METALCORE_HOST_NAME(rmsnorm, variant, tok))]] [[kernel]] void func<T, W>( \
      device const T*, device const T*, device const T*, device T*, device T*, constant Params&, \
      uint, uint, uint, uint, uint, uint);
#define METALCORE_RMSNORM_BWD(func, variant, T, W, tok)                                          \
  template [[host_name(METALCORE_HOST_NAME(rmsnorm, variant, tok))]] [[kernel]] void func<T, W>( \
      device const T*, device const T*, device const T*, device const T*, device T*,             \
      device float*, constant Params&, uint, uint, uint, uint, uint, uint);
#define METALCORE_RMSNORM_INSTANTIATE(T, tok)                                          \
  METALCORE_RMSNORM_FWD(rmsnorm_single, single, T, 1, tok)                             \
  METALCORE_RMSNORM_FWD(rmsnorm_single, single_vec4, T, 4, tok)                        \
  METALCORE_RMSNORM_FWD(rmsnorm_looped, looped, T, 1, tok)                             \
  METALCORE_RMSNORM_FWD(rmsnorm_looped, looped_vec4, T, 4, tok)                        \
  METALCORE_RMSNORM_BWD(rmsnorm_bwd_single, bwd_single, T, 1, tok)                     \
  METALCORE_RMSNORM_BWD(rmsnorm_bwd_single, bwd_single_vec4, T, 4, tok)                \
  METALCORE_RMSNORM_BWD(rmsnorm_bwd_looped, bwd_looped, T, 1, tok)                     \
  METALCORE_RMSNORM_BWD(rmsnorm_bwd_looped, bwd_looped_vec4, T, 4, tok)                \
  template [[host_name(METALCORE_HOST_NAME(rmsnorm, dw_reduce, tok))]] [[kernel]] void \
  rmsnorm_dw_reduce<T>(device const float*, device T*, constant uint&, constant uint&, uint);

METALCORE_FOR_EACH_FLOAT(METALCORE_RMSNORM_INSTANTIATE)
