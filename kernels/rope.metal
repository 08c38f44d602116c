// Rotary embedding, forward and backward (the transposed map) in one kernel, computed on the fly:
// nothing rotated is materialised. Thread (x, s, z): x < rot/2 rotates pair x, larger x copies
// two pass-through features (partial rotary); the thread walks kHeadsPerThread heads of one
// batch item, reusing its cos/sin loads. The output is contiguous [B, H, S, D].
#include <metal_stdlib>

#include "common/utils.h"
#include "rope.h"

using namespace metal;
using metalcore::rope_k::kHeadsPerThread;
using metalcore::rope_k::Params;

// Interleaved (GPT-J): pairs (2i, 2i+1); otherwise (Llama/HF) pairs (i, i + rot/2).
template <typename T, typename C, bool Interleaved>
[[kernel]] void rope(device const T* x [[buffer(0)]], device const C* cos_t [[buffer(1)]],
                     device const C* sin_t [[buffer(2)]], device T* out [[buffer(3)]],
                     constant Params& p [[buffer(4)]], uint3 pos [[thread_position_in_grid]]) {
  const uint half_rot = p.rot / 2;
  const uint head_groups = metalcore::ceil_div(p.heads, kHeadsPerThread);
  const uint s = pos.y, b = pos.z / head_groups, h0 = (pos.z % head_groups) * kHeadsPerThread;
  // Columns: rot/2 pairs, then ceil((D - rot) / 2) pass-through pairs.
  if (pos.x >= half_rot + (p.head_dim - p.rot + 1) / 2 || s >= p.seq) return;
  const uint h_end = min(p.heads, h0 + kHeadsPerThread);
  const ulong out_row = ulong(p.seq) * p.head_dim;  // elements per (b, h) in the output

  if (pos.x >= half_rot) {
    const uint j = p.rot + 2 * (pos.x - half_rot);
    for (uint h = h0; h < h_end; ++h) {
      device const T* xr = x + b * p.in_stride_b + h * p.in_stride_h + s * p.in_stride_s;
      device T* o = out + (ulong(b) * p.heads + h) * out_row + ulong(s) * p.head_dim;
      o[j] = xr[j];
      if (j + 1 < p.head_dim) o[j + 1] = xr[j + 1];
    }
    return;
  }
  const uint j = Interleaved ? 2 * pos.x : pos.x;                 // first slot of the pair
  const uint q = Interleaved ? 2 * pos.x + 1 : pos.x + half_rot;  // its partner
  const ulong t = b * p.table_stride_b + s * p.table_stride_s;
  const float cj = float(cos_t[t + j]), cq = float(cos_t[t + q]);
  const float sj = float(sin_t[t + j]), sq = float(sin_t[t + q]);
  // Forward: o_j = c_j x_j - s_j x_q, o_q = c_q x_q + s_q x_j. Backward is its transpose.
  const float a_j = p.transpose ? sq : -sj;
  const float a_q = p.transpose ? -sj : sq;
  for (uint h = h0; h < h_end; ++h) {
    device const T* xr = x + b * p.in_stride_b + h * p.in_stride_h + s * p.in_stride_s;
    device T* o = out + (ulong(b) * p.heads + h) * out_row + ulong(s) * p.head_dim;
    const float xj = float(xr[j]), xq = float(xr[q]);
    o[j] = T(cj * xj + a_j * xq);
    o[q] = T(cq * xq + a_q * xj);
  }
}

#define METALCORE_ROPE_ONE(variant, T, C, I, tok)                                                \
  template [[host_name(METALCORE_HOST_NAME(rope, variant, tok))]] [[kernel]] void rope<T, C, I>( \
      device const T*, device const C*, device const C*, device T*, constant Params&, uint3);
// Tables in the input dtype, or float32 tables for 16-bit inputs (exact angles).
#define METALCORE_ROPE_INSTANTIATE(T, tok)                     \
  METALCORE_ROPE_ONE(halfsplit, T, T, false, tok)              \
  METALCORE_ROPE_ONE(interleaved, T, T, true, tok)             \
  METALCORE_ROPE_ONE(halfsplit_f32table, T, float, false, tok) \
  METALCORE_ROPE_ONE(interleaved_f32table, T, float, true, tok)

METALCORE_ROPE_INSTANTIATE(half, float16)
METALCORE_ROPE_INSTANTIATE(bfloat, bfloat16)
METALCORE_ROPE_ONE(halfsplit, float, float, false, float32)
METALCORE_ROPE_ONE(interleaved, float, float, true, float32)
