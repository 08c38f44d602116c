// Function constants (values, optional buffers, derived constants) and per-lane access to
// simdgroup_matrix elements.
#include <metal_stdlib>
using namespace metal;

constant bool has_bias [[function_constant(0)]];
constant float gain [[function_constant(1)]];
constant bool no_bias = !is_function_constant_defined(has_bias) || !has_bias;

kernel void affine(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                   device const float* bias [[buffer(2), function_constant(has_bias)]],
                   uint i [[thread_position_in_grid]]) {
  y[i] = x[i] * gain + (no_bias ? 0.0f : bias[i]);
}

// Lanes fill matrices through thread_elements() only (lane layout of MLX's get_coord): m holds
// each element's linear index, eye the identity. Then out = 2 * (m x eye), doubled per lane.
kernel void fragment_layout(device float* coords [[buffer(0)]], device float* out [[buffer(1)]],
                            uint lane [[thread_index_in_simdgroup]]) {
  const uint q = lane / 4, row = (q & 4) + (lane / 2) % 4, col = (q & 2) * 2 + (lane % 2) * 2;
  simdgroup_float8x8 m = make_filled_simdgroup_matrix<float, 8, 8>(-1.0f);
  simdgroup_float8x8 eye = make_filled_simdgroup_matrix<float, 8, 8>(-1.0f);
  simdgroup_float8x8 zero = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  simdgroup_float8x8 acc;
  m.thread_elements() = float2(float(row * 8 + col), float(row * 8 + col + 1));
  eye.thread_elements() = float2(row == col ? 1.0f : 0.0f, row == col + 1 ? 1.0f : 0.0f);
  simdgroup_store(m, coords, 8);
  simdgroup_multiply_accumulate(acc, m, eye, zero);
  acc.thread_elements() *= 2.0f;
  simdgroup_store(acc, out, 8);
}
