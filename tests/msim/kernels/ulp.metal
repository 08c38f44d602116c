// Math functions with an accuracy bound in the MSL specification, for ulp mode: column k of the
// output holds function k of the input (tests/msim/test_ulp.py lists them in this order).
#include <metal_stdlib>
using namespace metal;

kernel void bounded_math(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                         constant uint& n [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  if (i >= n) return;
  const float v = x[i];
  const float p = fabs(v) + 0.25f;  // positive arguments for log, pow and rsqrt
  device float* out = y + i * 12;
  out[0] = exp(v);
  out[1] = precise::exp(v);
  out[2] = fast::exp(v);
  out[3] = log(p);
  out[4] = precise::log(p);
  out[5] = precise::log2(p);
  out[6] = tanh(v);
  out[7] = precise::tanh(v);
  out[8] = precise::pow(p, 1.5f);
  out[9] = precise::rsqrt(p);
  out[10] = precise::sin(v);
  out[11] = float(exp(half(v)));
}
