// SiLU, GELU (erf and tanh) and SwiGLU, forward and backward: bandwidth-bound elementwise kernels
// computing in float; each byte is read or written once (swiglu fwd: 3 tensors, bwd: 5).
#include <metal_stdlib>

#include "activation.h"
#include "common/math.h"
#include "common/utils.h"

using namespace metal;
using metalcore::activation_k::kIlp;
using metalcore::activation_k::Params;

// A named namespace (not an anonymous one): kernels instantiated with these types must keep
// external linkage to be exported from the library.
namespace metalcore {
namespace act {

constant constexpr float kSqrt1_2 = 0.70710678118654752f;
constant constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constant constexpr float kSqrt2OverPi = 0.79788456080286536f;
constant constexpr float kTanhCoef = 0.044715f;

struct Silu {
  static float fwd(float x) { return x * metalcore::sigmoid(x); }
  // d/dx[x s(x)] = s (1 + x (1 - s))
  static float bwd(float g, float x) {
    const float s = metalcore::sigmoid(x);
    return g * s * (1.0f + x * (1.0f - s));
  }
};

struct GeluErf {
  static float fwd(float x) { return 0.5f * x * metalcore::one_plus_erf(x * kSqrt1_2); }
  // d/dx = Phi(x) + x phi(x)
  static float bwd(float g, float x) {
    const float cdf = 0.5f * metalcore::one_plus_erf(x * kSqrt1_2);
    const float pdf = kInvSqrt2Pi * precise::exp(-0.5f * x * x);
    return g * (cdf + x * pdf);
  }
};

struct GeluTanh {
  // 0.5 x (1 + tanh u) = x sigmoid(2u), u = k (x + c x^3): no cancellation of 1 + tanh u in the
  // negative tail.
  static float fwd(float x) {
    return x * metalcore::sigmoid(2.0f * kSqrt2OverPi * (x + kTanhCoef * x * x * x));
  }
  // s = sigmoid(2u), 1 - tanh^2 u = 4 s (1 - s): d/dx = s + 2 s (1 - s) x k (1 + 3 c x^2)
  static float bwd(float g, float x) {
    const float x2 = x * x;
    const float s = metalcore::sigmoid(2.0f * kSqrt2OverPi * (x + kTanhCoef * x2 * x));
    // s (1 - s) vanishes once |x| > ~10, so capping x^2 in the last factor changes nothing but
    // keeps it finite: past |x| = 1.8e19, x^2 overflows and 0 * inf would be NaN.
    const float poly = 1.0f + 3.0f * kTanhCoef * min(x2, 1e4f);
    return g * (s + 2.0f * s * (1.0f - s) * x * kSqrt2OverPi * poly);
  }
};

}  // namespace act
}  // namespace metalcore

using metalcore::act::GeluErf;
using metalcore::act::GeluTanh;
using metalcore::act::Silu;

// First element of this thread's block; elements are base + k * tpg for k < kIlp.
inline ulong block_base(uint group, uint tid, uint tpg) { return ulong(group) * tpg * kIlp + tid; }

template <typename T, typename Op>
[[kernel]] void act_fwd(device const T* x [[buffer(0)]], device T* out [[buffer(1)]],
                        constant Params& p [[buffer(2)]],
                        uint group [[threadgroup_position_in_grid]],
                        uint tid [[thread_index_in_threadgroup]],
                        uint tpg [[threads_per_threadgroup]]) {
  const ulong base = block_base(group, tid, tpg);
  float v[kIlp];
  for (uint k = 0; k < kIlp; ++k) {
    const ulong i = base + k * tpg;
    v[k] = i < p.numel ? float(x[i]) : 0.0f;
  }
  for (uint k = 0; k < kIlp; ++k) {
    const ulong i = base + k * tpg;
    if (i < p.numel) out[i] = T(Op::fwd(v[k]));
  }
}

template <typename T, typename Op>
[[kernel]] void act_bwd(device const T* grad_out [[buffer(0)]], device const T* x [[buffer(1)]],
                        device T* grad_input [[buffer(2)]], constant Params& p [[buffer(3)]],
                        uint group [[threadgroup_position_in_grid]],
                        uint tid [[thread_index_in_threadgroup]],
                        uint tpg [[threads_per_threadgroup]]) {
  const ulong base = block_base(group, tid, tpg);
  float g[kIlp], v[kIlp];
  for (uint k = 0; k < kIlp; ++k) {
    const ulong i = base + k * tpg;
    g[k] = i < p.numel ? float(grad_out[i]) : 0.0f;
    v[k] = i < p.numel ? float(x[i]) : 0.0f;
  }
  for (uint k = 0; k < kIlp; ++k) {
    const ulong i = base + k * tpg;
    if (i < p.numel) grad_input[i] = T(Op::bwd(g[k], v[k]));
  }
}

// swiglu(gate, up) = silu(gate) * up
template <typename T>
[[kernel]] void swiglu_fwd(device const T* gate [[buffer(0)]], device const T* up [[buffer(1)]],
                           device T* out [[buffer(2)]], constant Params& p [[buffer(3)]],
                           uint group [[threadgroup_position_in_grid]],
                           uint tid [[thread_index_in_threadgroup]],
                           uint tpg [[threads_per_threadgroup]]) {
  const ulong base = block_base(group, tid, tpg);
  float a[kIlp], b[kIlp];
  for (uint k = 0; k < kIlp; ++k) {
    const ulong i = base + k * tpg;
    a[k] = i < p.numel ? float(gate[i]) : 0.0f;
    b[k] = i < p.numel ? float(up[i]) : 0.0f;
  }
  for (uint k = 0; k < kIlp; ++k) {
    const ulong i = base + k * tpg;
    if (i < p.numel) out[i] = T(Silu::fwd(a[k]) * b[k]);
  }
}

// d gate = g * up * s (1 + gate (1 - s)); d up = g * silu(gate)
template <typename T>
[[kernel]] void swiglu_bwd(device const T* grad_out [[buffer(0)]],
                           device const T* gate [[buffer(1)]], device const T* up [[buffer(2)]],
                           device T* grad_gate [[buffer(3)]], device T* grad_up [[buffer(4)]],
                           constant Params& p [[buffer(5)]],
                           uint group [[threadgroup_position_in_grid]],
                           uint tid [[thread_index_in_threadgroup]],
                           uint tpg [[threads_per_threadgroup]]) {
  const ulong base = block_base(group, tid, tpg);
  float g[kIlp], a[kIlp], b[kIlp];
  for (uint k = 0; k < kIlp; ++k) {
    const ulong i = base + k * tpg;
    const bool ok = i < p.numel;
    g[k] = ok ? float(grad_out[i]) : 0.0f;
    a[k] = ok ? float(gate[i]) : 0.0f;
    b[k] = ok ? float(up[i]) : 0.0f;
  }
  for (uint k = 0; k < kIlp; ++k) {
    const ulong i = base + k * tpg;
    if (i < p.numel) {
      const float s = metalcore::sigmoid(a[k]);
      // The derivative factor (|.| <= 1.1) scales g before up does: g * up alone can overflow
      // where the gradient is finite.
      grad_gate[i] = T((g[k] * (s * (1.0f + a[k] * (1.0f - s)))) * b[k]);
      grad_up[i] = T(g[k] * (a[k] * s));  // silu(gate) first: g * gate alone can overflow
    }
  }
}

#define METALCORE_ACT_FWD(family, variant, Op, T, tok)                              \
  template [[host_name(METALCORE_HOST_NAME(family, variant, tok))]] [[kernel]] void \
  act_fwd<T, Op>(device const T*, device T*, constant Params&, uint, uint, uint);
#define METALCORE_ACT_BWD(family, variant, Op, T, tok)                              \
  template [[host_name(METALCORE_HOST_NAME(family, variant, tok))]] [[kernel]] void \
  act_bwd<T, Op>(device const T*, device const T*, device T*, constant Params&, uint, uint, uint);
#define METALCORE_ACTIVATION_INSTANTIATE(T, tok)                                                 \
  METALCORE_ACT_FWD(silu, fwd, Silu, T, tok)                                                     \
  METALCORE_ACT_BWD(silu, bwd, Silu, T, tok)                                                     \
  METALCORE_ACT_FWD(gelu, erf_fwd, GeluErf, T, tok)                                              \
  METALCORE_ACT_BWD(gelu, erf_bwd, GeluErf, T, tok)                                              \
  METALCORE_ACT_FWD(gelu, tanh_fwd, GeluTanh, T, tok)                                            \
  METALCORE_ACT_BWD(gelu, tanh_bwd, GeluTanh, T, tok)                                            \
  template [[host_name(METALCORE_HOST_NAME(swiglu, fwd, tok))]] [[kernel]] void swiglu_fwd<T>(   \
      device const T*, device const T*, device T*, constant Params&, uint, uint, uint);          \
  template [[host_name(METALCORE_HOST_NAME(swiglu, bwd, tok))]] [[kernel]] void swiglu_bwd<T>(   \
      device const T*, device const T*, device const T*, device T*, device T*, constant Params&, \
      uint, uint, uint);

METALCORE_FOR_EACH_FLOAT(METALCORE_ACTIVATION_INSTANTIATE)
