// CUDA kernels of rope / rope_backward (entry points in rope_cuda.cpp). Each thread owns one
// "slot" of VEC features of one head of one token: a pair of vectors i, i + rot/2 for the
// half-split layout, one vector of adjacent pairs for GPT-J, or a pass-through vector past rot.
// All of a thread's loads (q/k and its cos/sin values) are independent and go out together; the
// tables are read through the read-only cache, where the heads of a token (the threads of a
// block) share them, so they cost about one DRAM read per token. No shared memory, no barrier:
// an earlier version staged each token's cos/sin in shared memory behind a barrier and topped out
// at 2.2 TB/s (bench/results/NOTES-cuda.md). q/k may have any strides with a unit head_dim stride
// (the HF [B, S, H, D] -> [B, H, S, D] transpose reads in place); outputs are contiguous.
#include <ATen/Dispatch.h>

#include "common/cuda_utils.cuh"
#include "rope/rope_cuda.h"

namespace metalcore {
namespace {

using cuda::acc_t;

// VEC elements from p: one aligned access when ALIGNED, else element by element (up to `valid`).
template <typename T, int VEC, bool ALIGNED>
__device__ __forceinline__ void load(const T* p, T (&o)[VEC], int valid = VEC) {
  if constexpr (ALIGNED) {
    const auto v = cuda::load_vec<T, VEC>(p);
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[j] = v.v[j];
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[j] = j < valid ? p[j] : T(0);
  }
}

template <typename T, int VEC, bool ALIGNED>
__device__ __forceinline__ void store(T* p, const T (&o)[VEC], int valid = VEC) {
  if constexpr (ALIGNED) {
    cuda::Vec<T, VEC> v;
#pragma unroll
    for (int j = 0; j < VEC; ++j) v.v[j] = o[j];
    cuda::store_vec(p, v);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (j < valid) p[j] = o[j];
  }
}

struct Strides {
  int64_t b, h, s;
};

// One table value through the read-only cache (__ldg has no overload for c10's 16-bit types).
template <typename C>
__device__ __forceinline__ C ldg_scalar(const C* p) {
  if constexpr (sizeof(C) == 2) {
    const unsigned short bits = __ldg(reinterpret_cast<const unsigned short*>(p));
    C c;
    memcpy(&c, &bits, sizeof(C));
    return c;
  } else {
    return __ldg(p);
  }
}

// VEC table values from p as accumulation type, through the read-only cache: 16-byte loads when
// TALIGNED, else element by element.
template <typename C, int VEC, bool TALIGNED, typename A>
__device__ __forceinline__ void load_table(const C* p, A (&o)[VEC]) {
  if constexpr (TALIGNED && (sizeof(C) * VEC) % 16 == 0) {
    constexpr int kPer = 16 / sizeof(C);
#pragma unroll
    for (int c = 0; c < VEC / kPer; ++c) {
      int4 r = __ldg(reinterpret_cast<const int4*>(p) + c);
      const C* e = reinterpret_cast<const C*>(&r);
#pragma unroll
      for (int j = 0; j < kPer; ++j) o[c * kPer + j] = static_cast<A>(e[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[j] = static_cast<A>(ldg_scalar(p + j));
  }
}

// Launch geometry: blocks of (slots, heads_per_block, tokens_per_block) threads over a grid of
// (seq groups, head groups, batch), so a thread finds its slot, head and token without an integer
// division. Measured on an H100 (bench shape, bench/results/README.md), forward: 2503 GB/s with a
// 1-D block and runtime divisions, 2110 with a batch loop in the kernel (80 registers), 2536
// without it (46 registers), 2573 when capped at 42 registers (3 blocks of 512 threads per SM),
// 2753 with int32 offsets and no pass-through branch (rope_slot) on top.
struct Geometry {
  int slots, rslots, heads_per_block, tokens_per_block;
};

// One slot (VEC features, or a pair of them) of head h of token (b, s). Offsets are computed in
// index type I: int32 when every offset of the call fits (half the integer instructions of
// int64 address math; fewer instructions before the loads means more bytes in flight). FULL:
// rot == head_dim, no pass-through slots.
template <typename T, typename C, int VEC, bool ALIGNED, bool TALIGNED, bool INTERLEAVED, bool BWD,
          typename I, bool FULL>
__device__ __forceinline__ void rope_slot(const T* __restrict__ q, const Strides& qs,
                                          const T* __restrict__ k, const Strides& ks,
                                          const C* __restrict__ cos, const C* __restrict__ sin,
                                          int64_t tb, int64_t ts, int64_t sb, int64_t ss,
                                          T* __restrict__ qo, T* __restrict__ ko, I b, I s, int h,
                                          int slot, int seq, int hq, int hk, int d, int rot,
                                          int rslots) {
  using A = acc_t<T>;
  const int half = rot / 2;
  const bool rotated = FULL || slot < rslots;
  // Feature offsets: e0 (and e1 = e0 + rot/2 for the half-split layout), or the pass-through.
  const int e0 = rotated ? slot * VEC : rot + (slot - rslots) * VEC;
  const int e1 = e0 + half;
  const int valid = rotated ? VEC : min(VEC, d - e0);
  const T* x = h < hq ? q + (b * I(qs.b) + I(h) * I(qs.h) + s * I(qs.s))
                      : k + (b * I(ks.b) + I(h - hq) * I(ks.h) + s * I(ks.s));
  T* y = h < hq ? qo + ((b * I(hq) + I(h)) * I(seq) + s) * I(d)
                : ko + ((b * I(hk) + I(h - hq)) * I(seq) + s) * I(d);

  T x0[VEC], x1[VEC];
  load<T, VEC, ALIGNED>(x + e0, x0, valid);
  if (!rotated) {
    store<T, VEC, ALIGNED>(y + e0, x0, valid);
    return;
  }
  const C* cr = cos + (b * I(tb) + s * I(ts));
  const C* sr = sin + (b * I(sb) + s * I(ss));
  A c0[VEC], s0[VEC];
  load_table<C, VEC, TALIGNED>(cr + e0, c0);
  load_table<C, VEC, TALIGNED>(sr + e0, s0);
  T o0[VEC];
  if constexpr (INTERLEAVED) {
#pragma unroll
    for (int j = 0; j < VEC; j += 2) {
      const A a = static_cast<A>(x0[j]), bb = static_cast<A>(x0[j + 1]);
      if constexpr (BWD) {  // transpose of the rotation
        o0[j] = T(a * c0[j] + bb * s0[j + 1]);
        o0[j + 1] = T(bb * c0[j + 1] - a * s0[j]);
      } else {
        o0[j] = T(a * c0[j] - bb * s0[j]);
        o0[j + 1] = T(bb * c0[j + 1] + a * s0[j + 1]);
      }
    }
    store<T, VEC, ALIGNED>(y + e0, o0);
  } else {
    load<T, VEC, ALIGNED>(x + e1, x1);
    A c1[VEC], s1[VEC];
    load_table<C, VEC, TALIGNED>(cr + e1, c1);
    load_table<C, VEC, TALIGNED>(sr + e1, s1);
    T o1[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A a = static_cast<A>(x0[j]), bb = static_cast<A>(x1[j]);
      if constexpr (BWD) {  // transpose of the rotation: sin terms swap halves and sign
        o0[j] = T(a * c0[j] + bb * s1[j]);
        o1[j] = T(bb * c1[j] - a * s0[j]);
      } else {
        o0[j] = T(a * c0[j] - bb * s0[j]);
        o1[j] = T(bb * c1[j] + a * s1[j]);
      }
    }
    store<T, VEC, ALIGNED>(y + e0, o0);
    store<T, VEC, ALIGNED>(y + e1, o1);
  }
}

template <typename T, typename C, int VEC, bool ALIGNED, bool TALIGNED, bool INTERLEAVED, bool BWD,
          typename I, bool FULL>
__global__ void __launch_bounds__(512, 3)
    rope_kernel(const T* __restrict__ q, Strides qs, const T* __restrict__ k, Strides ks,
                const C* __restrict__ cos, const C* __restrict__ sin, int64_t tb, int64_t ts,
                int64_t sb, int64_t ss, T* __restrict__ qo, T* __restrict__ ko, int seq, int hq,
                int hk, int d, int rot, int rslots) {
  const int slot = threadIdx.x;
  const int h = blockIdx.y * blockDim.y + threadIdx.y;
  const unsigned s = blockIdx.x * blockDim.z + threadIdx.z;
  if (h >= hq + hk || s >= static_cast<unsigned>(seq)) return;
  rope_slot<T, C, VEC, ALIGNED, TALIGNED, INTERLEAVED, BWD, I, FULL>(
      q, qs, k, ks, cos, sin, tb, ts, sb, ss, qo, ko, static_cast<I>(blockIdx.z), static_cast<I>(s),
      h, slot, seq, hq, hk, d, rot, rslots);
}

template <typename T, typename C, int VEC, bool ALIGNED, bool TALIGNED, bool BWD,
          typename I = int64_t, bool FULL = false>
void launch_kernel(bool interleaved, const T* q, Strides qs, const T* k, Strides ks, const C* cp,
                   const C* sp, int64_t tb, int64_t ts, int64_t sb, int64_t ss, T* qo, T* ko,
                   const rope::Dims& dm, cudaStream_t stream) {
  Geometry g;
  g.rslots = static_cast<int>(interleaved ? dm.rot / VEC : dm.rot / 2 / VEC);
  g.slots = g.rslots + static_cast<int>(cuda::ceil_div(dm.head_dim - dm.rot, VEC));
  TORCH_CHECK(g.slots <= 512, "metalcore.rope: head_dim too large");
  const int64_t heads = dm.q_heads + dm.k_heads;
  // About 256-512 threads per block: all heads of a token when they fit, several tokens per
  // block when a token has few slots (at most 64, CUDA's limit on blockDim.z, and never more
  // tokens than the sequence has).
  g.heads_per_block = static_cast<int>(std::min<int64_t>(heads, std::max(1, 512 / g.slots)));
  g.tokens_per_block = static_cast<int>(
      std::min<int64_t>({dm.seq, 64, std::max(1, 256 / (g.slots * g.heads_per_block))}));
  TORCH_CHECK(dm.seq <= INT32_MAX && dm.batch <= INT32_MAX && heads <= INT32_MAX,
              "metalcore.rope: batch, seq or heads too large");
  const dim3 block(static_cast<unsigned>(g.slots), static_cast<unsigned>(g.heads_per_block),
                   static_cast<unsigned>(g.tokens_per_block));
  const unsigned seq_blocks = static_cast<unsigned>(cuda::ceil_div(dm.seq, g.tokens_per_block));
  const unsigned head_blocks = static_cast<unsigned>(cuda::ceil_div(heads, g.heads_per_block));
  TORCH_CHECK(head_blocks <= 65535, "metalcore.rope: too many heads");
  const int seq = static_cast<int>(dm.seq), hq = static_cast<int>(dm.q_heads),
            hk = static_cast<int>(dm.k_heads), d = static_cast<int>(dm.head_dim),
            rot = static_cast<int>(dm.rot);
  // grid.z is the batch index, at most 65535 per launch: larger batches take several launches
  // (a batch loop inside the kernel cost 17% of its speed, above).
  constexpr int64_t kMaxGridZ = 65535;
  for (int64_t b0 = 0; b0 < dm.batch; b0 += kMaxGridZ) {
    const dim3 grid(seq_blocks, head_blocks,
                    static_cast<unsigned>(std::min(kMaxGridZ, dm.batch - b0)));
    const T* qb = q + b0 * qs.b;
    const T* kb = k + b0 * ks.b;
    const C* cb = cp + b0 * tb;
    const C* sb0 = sp + b0 * sb;
    T* qob = qo + b0 * dm.q_heads * dm.seq * dm.head_dim;
    T* kob = ko + b0 * dm.k_heads * dm.seq * dm.head_dim;
    if (interleaved) {
      rope_kernel<T, C, VEC, ALIGNED, TALIGNED, true, BWD, I, FULL><<<grid, block, 0, stream>>>(
          qb, qs, kb, ks, cb, sb0, tb, ts, sb, ss, qob, kob, seq, hq, hk, d, rot, g.rslots);
    } else {
      rope_kernel<T, C, VEC, ALIGNED, TALIGNED, false, BWD, I, FULL><<<grid, block, 0, stream>>>(
          qb, qs, kb, ks, cb, sb0, tb, ts, sb, ss, qob, kob, seq, hq, hk, d, rot, g.rslots);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// True when every element offset the kernel computes for these tensors (and for the contiguous
// outputs, the size of q and k) fits in int32.
bool offsets_fit_int32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                       const at::Tensor& sin) {
  auto span = [](const at::Tensor& t) {  // one past the largest element offset
    int64_t last = 0;
    for (int64_t i = 0; i < t.dim(); ++i) last += (t.size(i) - 1) * t.stride(i);
    return std::max<int64_t>(last + 1, t.numel());
  };
  return span(q) <= INT32_MAX && span(k) <= INT32_MAX && span(cos) <= INT32_MAX &&
         span(sin) <= INT32_MAX;
}

template <typename T, typename C, bool BWD>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
         bool interleaved, const rope::Dims& dm, const at::Tensor& qo, const at::Tensor& ko) {
  constexpr int V = cuda::vec_width<T>();
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const C* cp = cos.const_data_ptr<C>();
  const C* sp = sin.const_data_ptr<C>();
  const Strides qs{q.stride(0), q.stride(1), q.stride(2)};
  const Strides ks{k.stride(0), k.stride(1), k.stride(2)};
  // A [1, S, R] table broadcasts over the batch.
  const int64_t tb = cos.size(0) == 1 ? 0 : cos.stride(0), ts = cos.stride(1);
  const int64_t sb = sin.size(0) == 1 ? 0 : sin.stride(0), ss = sin.stride(1);
  const auto div = [](int64_t v, int64_t m) { return v % m == 0; };
  const bool aligned = div(interleaved ? dm.rot : dm.rot / 2, V) && div(dm.head_dim - dm.rot, V) &&
                       div(dm.head_dim, V) && cuda::aligned16(qp) && cuda::aligned16(kp) &&
                       div(qs.b, V) && div(qs.h, V) && div(qs.s, V) && div(ks.b, V) &&
                       div(ks.h, V) && div(ks.s, V);
  // Tables in 16-byte pieces: VEC table values span a whole number of 16-byte words, each row
  // starts on one.
  constexpr int64_t kTableVec = 16 / sizeof(C);
  const bool table_aligned = cuda::aligned16(cp) && cuda::aligned16(sp) && div(tb, kTableVec) &&
                             div(ts, kTableVec) && div(sb, kTableVec) && div(ss, kTableVec) &&
                             (sizeof(C) * V) % 16 == 0;
  T* qop = qo.mutable_data_ptr<T>();
  T* kop = ko.mutable_data_ptr<T>();
  const cudaStream_t stream = cuda::current_stream();
  if (aligned && table_aligned && dm.rot == dm.head_dim && offsets_fit_int32(q, k, cos, sin)) {
    // The common case (full rotary, < 2^31 elements per tensor): int32 offsets, no pass-through.
    launch_kernel<T, C, V, true, true, BWD, int32_t, true>(interleaved, qp, qs, kp, ks, cp, sp, tb,
                                                           ts, sb, ss, qop, kop, dm, stream);
  } else if (aligned && table_aligned) {
    launch_kernel<T, C, V, true, true, BWD>(interleaved, qp, qs, kp, ks, cp, sp, tb, ts, sb, ss,
                                            qop, kop, dm, stream);
  } else if (aligned) {
    launch_kernel<T, C, V, true, false, BWD>(interleaved, qp, qs, kp, ks, cp, sp, tb, ts, sb, ss,
                                             qop, kop, dm, stream);
  } else if (interleaved) {
    launch_kernel<T, C, 2, false, false, BWD>(true, qp, qs, kp, ks, cp, sp, tb, ts, sb, ss, qop,
                                              kop, dm, stream);
  } else {
    launch_kernel<T, C, 1, false, false, BWD>(false, qp, qs, kp, ks, cp, sp, tb, ts, sb, ss, qop,
                                              kop, dm, stream);
  }
}

}  // namespace

namespace cuda {

void launch_rope(bool backward, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                 const at::Tensor& sin, bool interleaved, const rope::Dims& dm,
                 const at::Tensor& qo, const at::Tensor& ko) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope_cuda", [&] {
    using T = scalar_t;
    const bool f32_table = cos.scalar_type() == at::kFloat && !std::is_same_v<T, float>;
    if (backward) {
      if (f32_table) {
        run<T, float, true>(q, k, cos, sin, interleaved, dm, qo, ko);
      } else {
        run<T, T, true>(q, k, cos, sin, interleaved, dm, qo, ko);
      }
    } else {
      if (f32_table) {
        run<T, float, false>(q, k, cos, sin, interleaved, dm, qo, ko);
      } else {
        run<T, T, false>(q, k, cos, sin, interleaved, dm, qo, ko);
      }
    }
  });
}

}  // namespace cuda
}  // namespace metalcore
