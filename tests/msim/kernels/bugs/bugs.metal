// Deliberately broken kernels, each next to its fixed twin. msim must flag every *_bug kernel
// with the right report and run every *_fixed kernel with no report.
#include <metal_stdlib>
using namespace metal;

// Early return before a barrier (flash-attention style): tail threads leave, others wait.
kernel void early_return_bug(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                             constant uint& n [[buffer(2)]], uint gid [[thread_position_in_grid]],
                             uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float tile[64];
  if (gid >= n) return;
  tile[tid] = x[gid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[gid] = tile[63 - tid];
}
kernel void early_return_fixed(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                               constant uint& n [[buffer(2)]], uint gid [[thread_position_in_grid]],
                               uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float tile[64];
  tile[tid] = gid < n ? x[gid] : 0.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (gid < n) y[gid] = tile[63 - tid];
}

// Barriers at different call sites in divergent branches.
kernel void divergent_barrier_bug(device float* y [[buffer(0)]],
                                  uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float s[64];
  if (tid < 32) {
    s[tid] = 1.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
  } else {
    s[tid] = 2.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  y[tid] = s[63 - tid];
}
kernel void divergent_barrier_fixed(device float* y [[buffer(0)]],
                                    uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float s[64];
  s[tid] = tid < 32 ? 1.0f : 2.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[tid] = s[63 - tid];
}

// Softmax-style row cache: 8192 floats plus scratch is over the 32 KB threadgroup limit.
kernel void tg_overflow_bug(device float* y [[buffer(0)]],
                            uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float row[8192];
  threadgroup float scratch[32];
  row[tid] = 1.0f;
  scratch[tid % 32] = 2.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[tid] = row[tid] + scratch[tid % 32];
}
kernel void tg_overflow_fixed(device float* y [[buffer(0)]],
                              uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float row[4096];
  threadgroup float scratch[32];
  row[tid] = 1.0f;
  scratch[tid % 32] = 2.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[tid] = row[tid] + scratch[tid % 32];
}

// Reduction that reads all 32 per-simdgroup slots although only n_sg were written.
kernel void uninit_read_bug(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                            uint tid [[thread_index_in_threadgroup]],
                            uint lane [[thread_index_in_simdgroup]],
                            uint sg [[simdgroup_index_in_threadgroup]],
                            uint n_sg [[simdgroups_per_threadgroup]]) {
  threadgroup float partial[32];
  float s = simd_sum(x[tid]);
  if (lane == 0) partial[sg] = s;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    float total = simd_sum(partial[lane]);
    if (lane == 0) y[0] = total;
  }
}
kernel void uninit_read_fixed(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                              uint tid [[thread_index_in_threadgroup]],
                              uint lane [[thread_index_in_simdgroup]],
                              uint sg [[simdgroup_index_in_threadgroup]],
                              uint n_sg [[simdgroups_per_threadgroup]]) {
  threadgroup float partial[32];
  float s = simd_sum(x[tid]);
  if (lane == 0) partial[sg] = s;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    float total = simd_sum(lane < n_sg ? partial[lane] : 0.0f);
    if (lane == 0) y[0] = total;
  }
}

// AdamW-style: no bounds check while the host rounds the grid up to whole threadgroups.
kernel void oob_bug(device float4* p [[buffer(0)]], device const float4* g [[buffer(1)]],
                    uint gid [[thread_position_in_grid]]) {
  p[gid] -= 0.1f * g[gid];
}
kernel void oob_fixed(device float4* p [[buffer(0)]], device const float4* g [[buffer(1)]],
                      constant uint& n4 [[buffer(2)]], uint gid [[thread_position_in_grid]]) {
  if (gid < n4) p[gid] -= 0.1f * g[gid];
}

// Scalar tail that writes one element too far (inside the last 16 bytes: caught by canaries).
kernel void tail_write_bug(device float* y [[buffer(0)]], constant uint& n [[buffer(1)]],
                           uint gid [[thread_position_in_grid]]) {
  if (gid <= n) y[gid] = 1.0f;
}
kernel void tail_write_fixed(device float* y [[buffer(0)]], constant uint& n [[buffer(1)]],
                             uint gid [[thread_position_in_grid]]) {
  if (gid < n) y[gid] = 1.0f;
}

// Per-thread array too large for a simulated thread's stack.
kernel void stack_overflow_bug(device float* y [[buffer(0)]], constant uint& n [[buffer(1)]],
                               uint gid [[thread_position_in_grid]]) {
  volatile float big[65536];
  for (uint i = 0; i < n; ++i) big[i * 97 % 65536] = float(i);
  y[gid] = big[n % 65536];
}
kernel void stack_overflow_fixed(device float* y [[buffer(0)]], constant uint& n [[buffer(1)]],
                                 uint gid [[thread_position_in_grid]]) {
  volatile float small[64];
  for (uint i = 0; i < n; ++i) small[i * 97 % 64] = float(i);
  y[gid] = small[n % 64];
}

// sdpa_vector-style loop: the shared slot is rewritten by the next iteration before every
// thread has read it (missing loop-end barrier).
kernel void missing_barrier_bug(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                                constant uint& iters [[buffer(2)]],
                                uint tid [[thread_index_in_threadgroup]],
                                uint tpg [[threads_per_threadgroup]]) {
  threadgroup float shared_val;
  float acc = 0.0f;
  for (uint it = 0; it < iters; ++it) {
    if (tid == 0) shared_val = x[it];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    acc += shared_val * float(tid + 1);
  }
  y[tid] = acc;
}
kernel void missing_barrier_fixed(device const float* x [[buffer(0)]],
                                  device float* y [[buffer(1)]], constant uint& iters [[buffer(2)]],
                                  uint tid [[thread_index_in_threadgroup]],
                                  uint tpg [[threads_per_threadgroup]]) {
  threadgroup float shared_val;
  float acc = 0.0f;
  for (uint it = 0; it < iters; ++it) {
    if (tid == 0) shared_val = x[it];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    acc += shared_val * float(tid + 1);
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  y[tid] = acc;
}

// Limit checked at dispatch: a kernel that declares a smaller maximum than it is launched with.
[[max_total_threads_per_threadgroup(256)]] kernel void capped(device float* y [[buffer(0)]],
                                                              uint gid
                                                              [[thread_position_in_grid]]) {
  y[gid] = float(gid);
}

// Device-memory race between threadgroups (only the race mode can see it).
kernel void cross_group_race_bug(device float* acc [[buffer(0)]],
                                 uint gid [[thread_position_in_grid]]) {
  acc[0] += float(gid);
}
kernel void cross_group_race_fixed(device atomic_float* acc [[buffer(0)]],
                                   uint gid [[thread_position_in_grid]]) {
  atomic_fetch_add_explicit(acc, float(gid), memory_order_relaxed);
}

kernel void dynamic_tg(device float* y [[buffer(0)]], threadgroup float* scratch [[threadgroup(0)]],
                       uint tid [[thread_index_in_threadgroup]],
                       uint tpg [[threads_per_threadgroup]]) {
  scratch[tid] = float(tid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[tid] = scratch[tpg - 1 - tid];
}

// Thread 0 spins on a flag that a later thread sets: no forward-progress guarantee on a GPU,
// and under msim's run-until-block scheduling it never ends (the watchdog reports it).
kernel void spin_wait_bug(device uint* y [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup atomic_uint flag;
  if (tid == 1) atomic_store_explicit(&flag, 1u, memory_order_relaxed);
  if (tid == 0)
    while (atomic_load_explicit(&flag, memory_order_relaxed) != 1u) {
    }
  y[tid] = tid;
}
kernel void spin_wait_fixed(device uint* y [[buffer(0)]],
                            uint tid [[thread_index_in_threadgroup]]) {
  threadgroup atomic_uint flag;
  if (tid == 1) atomic_store_explicit(&flag, 1u, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);  // wait for the writer instead of spinning
  y[tid] = atomic_load_explicit(&flag, memory_order_relaxed) + tid;
}

// Reads one element past a threadgroup array (a neighbour-exchange off by one).
kernel void tg_oob_bug(device float* y [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float tile[64];
  tile[tid] = float(tid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[tid] = tile[tid + 1];
}
kernel void tg_oob_fixed(device float* y [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float tile[64];
  tile[tid] = float(tid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[tid] = tile[(tid + 1) % 64];
}
