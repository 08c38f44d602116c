// Fused AdamW over many tensors in two launches: `prepare` increments every step and computes
// each tensor's bias corrections once; `step` updates all elements of all tensors, reading
// param, grad, exp_avg, exp_avg_sq (and max_exp_avg_sq) once and writing the states once.
#include <metal_stdlib>

#include "adamw.h"
#include "common/math.h"
#include "common/utils.h"

using namespace metal;
using metalcore::adamw_k::kAmsgrad;
using metalcore::adamw_k::kChunk;
using metalcore::adamw_k::kLrOnHost;
using metalcore::adamw_k::kMaximize;
using metalcore::adamw_k::Params;
using metalcore::adamw_k::TensorMeta;

// coef[i] = (1 - lr * weight_decay, lr / (1 - beta1^step), 1 / sqrt(1 - beta2^step), 0).
// L: dtype of the lr buffer (and of the float32 steps).
template <typename L>
[[kernel]] void adamw_prepare(constant TensorMeta* meta [[buffer(0)]],
                              device const L* lr_buf [[buffer(1)]],
                              device float4* coef [[buffer(2)]], constant Params& p [[buffer(3)]],
                              uint i [[thread_position_in_grid]]) {
  if (i >= p.num_tensors) return;
  device float* step_ptr = meta[i].step;
  const float step = *step_ptr + 1.0f;
  *step_ptr = step;
  const float lr = (p.flags & kLrOnHost) ? p.lr : float(lr_buf[0]);
  const float bc1 = -metalcore::expm1(step * p.log_beta1);
  const float bc2 = -metalcore::expm1(step * p.log_beta2);
  coef[i] = float4(1.0f - lr * p.weight_decay, lr / bc1, precise::rsqrt(bc2), 0.0f);
}

template <typename P, typename S>
[[kernel]] void adamw_step(constant TensorMeta* meta [[buffer(0)]],
                           device const float4* coef [[buffer(1)]],
                           constant Params& p [[buffer(2)]],
                           uint group [[threadgroup_position_in_grid]],
                           uint tid [[thread_index_in_threadgroup]],
                           uint tpg [[threads_per_threadgroup]]) {
  // The tensor owning this chunk: the last one whose chunk_begin <= group (binary search).
  uint lo = 0, hi = p.num_tensors;
  while (hi - lo > 1) {
    const uint mid = (lo + hi) / 2;
    if (meta[mid].chunk_begin <= group) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  constant TensorMeta& m = meta[lo];
  const float4 k = coef[lo];
  device P* param = reinterpret_cast<device P*>(m.param);
  device const P* grad = reinterpret_cast<device const P*>(m.grad);
  device S* exp_avg = reinterpret_cast<device S*>(m.exp_avg);
  device S* exp_avg_sq = reinterpret_cast<device S*>(m.exp_avg_sq);
  device S* max_sq = reinterpret_cast<device S*>(m.max_exp_avg_sq);
  const bool amsgrad = (p.flags & kAmsgrad) != 0;
  const float sign = (p.flags & kMaximize) ? -1.0f : 1.0f;
  const ulong begin = ulong(group - m.chunk_begin) * kChunk;
  const ulong end = min(m.numel, begin + kChunk);
  for (ulong i = begin + tid; i < end; i += tpg) {
    const float g = sign * float(grad[i]);
    float mv = float(exp_avg[i]);
    float vv = float(exp_avg_sq[i]);
    // torch's lerp: exact at weight 1 (beta1 = 0 gives m = g), stable on both halves.
    const float w1 = p.one_minus_beta1;
    mv = w1 < 0.5f ? mv + w1 * (g - mv) : g - (g - mv) * (1.0f - w1);
    vv = p.beta2 * vv + p.one_minus_beta2 * g * g;
    // The update uses the moments as stored (rounded to S), as torch's in-place ops do.
    const S m_s = S(mv), v_s = S(vv);
    exp_avg[i] = m_s;
    exp_avg_sq[i] = v_s;
    float vd = float(v_s);
    if (amsgrad) {
      // torch.maximum propagates NaN; Metal's max() would drop it.
      const float prev = float(max_sq[i]);
      vd = (isnan(prev) || isnan(vd)) ? prev + vd : max(prev, vd);
      max_sq[i] = S(vd);
    }
    const float denom = precise::sqrt(vd) * k.z + p.eps;
    param[i] = P(float(param[i]) * k.x - k.y * float(m_s) / denom);
  }
}

template [[host_name(METALCORE_HOST_NAME(adamw, prepare, float32))]] [[kernel]] void
adamw_prepare<float>(constant TensorMeta*, device const float*, device float4*, constant Params&,
                     uint);

#define METALCORE_ADAMW_ONE(variant, P, S, tok)                                              \
  template [[host_name(METALCORE_HOST_NAME(adamw, variant, tok))]] [[kernel]] void           \
  adamw_step<P, S>(constant TensorMeta*, device const float4*, constant Params&, uint, uint, \
                   uint);
#define METALCORE_ADAMW_INSTANTIATE(T, tok) METALCORE_ADAMW_ONE(step, T, T, tok)
METALCORE_FOR_EACH_FLOAT(METALCORE_ADAMW_INSTANTIATE)
// 16-bit params with float32 states (master-weight style).
METALCORE_ADAMW_ONE(step_f32state, half, float, float16)
METALCORE_ADAMW_ONE(step_f32state, bfloat, float, bfloat16)
