// Elementwise SiLU: one element per thread, and a float4 body with a scalar tail.
#include <metal_stdlib>
using namespace metal;

template <typename T>
kernel void silu(device const T* x [[buffer(0)]], device T* y [[buffer(1)]],
                 constant uint& n [[buffer(2)]], uint gid [[thread_position_in_grid]]) {
  if (gid >= n) return;
  float v = float(x[gid]);
  y[gid] = T(v / (1.0f + exp(-v)));
}
template [[host_name("silu_float")]] kernel void silu<float>(device const float*, device float*,
                                                             constant uint&, uint);
template [[host_name("silu_half")]] kernel void silu<half>(device const half*, device half*,
                                                           constant uint&, uint);
template [[host_name("silu_bfloat")]] kernel void silu<bfloat>(device const bfloat*, device bfloat*,
                                                               constant uint&, uint);

// Each thread handles 4 elements; the last thread finishes the n % 4 tail element-wise.
kernel void silu_vec4(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                      constant uint& n [[buffer(2)]], uint gid [[thread_position_in_grid]]) {
  uint base = gid * 4;
  if (base + 4 <= n) {
    float4 v = *(device const float4*)(x + base);
    *(device float4*)(y + base) = v / (1.0f + exp(-v));
  } else {
    for (uint i = base; i < n; ++i) y[i] = x[i] / (1.0f + exp(-x[i]));
  }
}

// Vector constructors, swizzles and conversions (checked against numpy in the tests).
kernel void vector_features(device const half4* h [[buffer(0)]], device float4* out [[buffer(1)]],
                            device int4* iout [[buffer(2)]], uint gid [[thread_position_in_grid]]) {
  float4 f = float4(h[gid]);  // converting, not a bit-cast
  float2 lo = f.xy;
  float4 g = float4(lo, f.zw * 2.0f);  // concatenation
  g.xy = g.yx;                         // swizzle store
  float4 s = float4(0.5f) + static_cast<float4>(h[gid]);
  out[gid * 2] = g;
  out[gid * 2 + 1] = s + float4(f.wzyx.x, 1.0f, 2.0h, 3);
  iout[gid] = int4(f) + int4(clamp(f, -1.0f, 1.0f) * 10.0f);
}

// Column-major matrix types: y = transpose(M) * (M * x) + M[1] with M built from columns.
kernel void matrix_types(device const float4* cols [[buffer(0)]],
                         device const float4* x [[buffer(1)]], device float4* y [[buffer(2)]],
                         uint i [[thread_position_in_grid]]) {
  float4x4 m = float4x4(cols[0], cols[1], cols[2], cols[3]);
  half4x4 h = half4x4(half(2.0f));
  float4 v = m * x[i];
  y[i] = transpose(m) * v + m[1] + float4(h[2]);
}
