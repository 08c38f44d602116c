// Minimal reproducers of the latent defects msim found in other projects' kernels
// (docs/msim-findings.md). Each kernel reduces the same way the upstream one does; the fixed
// variant next to it is what the finding suggests.
#include <metal_stdlib>
using namespace metal;

// Per-simdgroup partial sums combined through a 32-slot threadgroup array. The first two read
// all 32 slots, which only exist when the threadgroup has 32 simdgroups (1024 threads).
kernel void partials_no_clear(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                              constant uint& n [[buffer(2)]],
                              uint row [[threadgroup_position_in_grid]],
                              uint tid [[thread_position_in_threadgroup]],
                              uint threads [[threads_per_threadgroup]],
                              uint lane [[thread_index_in_simdgroup]],
                              uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float partial[32];
  float s = 0.0f;
  for (uint i = tid; i < n; i += threads) s += x[row * n + i];
  s = simd_sum(s);
  if (lane == 0) partial[sg] = s;  // MLX softmax_looped: no slot is cleared
  threadgroup_barrier(mem_flags::mem_threadgroup);
  s = simd_sum(partial[lane]);  // every simdgroup reads all 32 slots
  if (tid == 0) out[row] = s;
}

kernel void partials_own_clear(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                               constant uint& n [[buffer(2)]],
                               uint row [[threadgroup_position_in_grid]],
                               uint tid [[thread_position_in_threadgroup]],
                               uint threads [[threads_per_threadgroup]],
                               uint lane [[thread_index_in_simdgroup]],
                               uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float partial[32];
  float s = 0.0f;
  for (uint i = tid; i < n; i += threads) s += x[row * n + i];
  s = simd_sum(s);
  if (lane == 0) partial[sg] = 0.0f;  // PyTorch layer_norm_looped: each clears its own slot
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (lane == 0) partial[sg] = s;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    s = simd_sum(partial[lane]);  // simdgroup 0 reads all 32 slots
    if (lane == 0) out[row] = s;
  }
}

kernel void partials_fixed(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                           constant uint& n [[buffer(2)]],
                           uint row [[threadgroup_position_in_grid]],
                           uint tid [[thread_position_in_threadgroup]],
                           uint threads [[threads_per_threadgroup]],
                           uint lane [[thread_index_in_simdgroup]],
                           uint sg [[simdgroup_index_in_threadgroup]],
                           uint n_sg [[simdgroups_per_threadgroup]]) {
  threadgroup float partial[32];
  float s = 0.0f;
  for (uint i = tid; i < n; i += threads) s += x[row * n + i];
  s = simd_sum(s);
  if (lane == 0) partial[sg] = s;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  s = simd_sum(lane < n_sg ? partial[lane] : 0.0f);  // only the slots that exist
  if (tid == 0) out[row] = s;
}

// A row-blocked mat-vec (ggml's mul_vec_q_n_f32_impl): each simdgroup computes kRows rows and
// forms pointers to all of them, so the last group reads past the matrix when rows % kRows != 0;
// only the store is guarded.
constant constexpr short kRows = 4;
kernel void rows_unguarded(device const float* w [[buffer(0)]], device const float* x [[buffer(1)]],
                           device float* y [[buffer(2)]], constant int& rows [[buffer(3)]],
                           constant int& cols [[buffer(4)]],
                           uint group [[threadgroup_position_in_grid]],
                           uint lane [[thread_index_in_simdgroup]]) {
  const int r0 = int(group) * kRows;
  float acc[kRows] = {0.0f};
  for (int c = int(lane); c < cols; c += 32)
    for (short r = 0; r < kRows; ++r) acc[r] += w[(r0 + r) * cols + c] * x[c];  // unguarded read
  for (short r = 0; r < kRows; ++r) {
    const float t = simd_sum(acc[r]);
    if (lane == 0 && r0 + r < rows) y[r0 + r] = t;  // guarded store
  }
}

kernel void rows_fixed(device const float* w [[buffer(0)]], device const float* x [[buffer(1)]],
                       device float* y [[buffer(2)]], constant int& rows [[buffer(3)]],
                       constant int& cols [[buffer(4)]], uint group [[threadgroup_position_in_grid]],
                       uint lane [[thread_index_in_simdgroup]]) {
  const int r0 = int(group) * kRows;
  float acc[kRows] = {0.0f};
  for (int c = int(lane); c < cols; c += 32)
    for (short r = 0; r < kRows; ++r)
      if (r0 + r < rows) acc[r] += w[(r0 + r) * cols + c] * x[c];
  for (short r = 0; r < kRows; ++r) {
    const float t = simd_sum(acc[r]);
    if (lane == 0 && r0 + r < rows) y[r0 + r] = t;
  }
}
