// CUDA kernels of rope / rope_backward (entry points in rope_cuda.cpp). One block per (batch,
// position): cos/sin of that position are loaded once per thread and reused for every q and k head,
// so the tables cost one read per token rather than one per head. Each thread owns one "slot" of
// VEC features of a head (a pair of vectors i, i + rot/2 for the half-split layout, one vector of
// adjacent pairs for GPT-J, or a pass-through vector past rot) and walks the heads. q/k may have
// any strides with a unit head_dim stride (the HF [B, S, H, D] -> [B, H, S, D] transpose reads in
// place); outputs are contiguous.
#include <ATen/Dispatch.h>
#include <torch/library.h>

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

template <typename T, typename C, int VEC, bool ALIGNED, bool INTERLEAVED, bool BWD>
__global__ void __launch_bounds__(1024)
    rope_kernel(const T* __restrict__ q, Strides qs, const T* __restrict__ k, Strides ks,
                const C* __restrict__ cos, const C* __restrict__ sin, int64_t tb, int64_t ts,
                int64_t sb, int64_t ss, T* __restrict__ qo, T* __restrict__ ko, int seq, int hq,
                int hk, int d, int rot) {
  using A = acc_t<T>;
  const int64_t b = blockIdx.x / seq, s = blockIdx.x % seq;
  const int half = rot / 2;
  const int rslots = INTERLEAVED ? rot / VEC : half / VEC;
  const int slots = rslots + (d - rot + VEC - 1) / VEC;
  const int slot = threadIdx.x % slots;
  const int heads_per_iter = blockDim.x / slots;
  const int h0 = threadIdx.x / slots;

  const bool rotated = slot < rslots;
  // Feature offsets: e0 (and e1 = e0 + rot/2 for the half-split layout), or the pass-through.
  const int e0 = rotated ? slot * VEC : rot + (slot - rslots) * VEC;
  const int e1 = e0 + half;
  const int valid = rotated ? VEC : min(VEC, d - e0);
  const int heads = hq + hk;
  const auto src = [&](int h) {
    return h < hq ? q + b * qs.b + h * qs.h + s * qs.s : k + b * ks.b + (h - hq) * ks.h + s * ks.s;
  };
  const auto dst = [&](int h) {
    return h < hq ? qo + ((b * hq + h) * seq + s) * d : ko + ((b * hk + h - hq) * seq + s) * d;
  };

  // The first head's inputs are requested before the table staging and its barrier.
  T x0[VEC], x1[VEC];
  if (h0 < heads) {
    load<T, VEC, ALIGNED>(src(h0) + e0, x0, valid);
    if (!INTERLEAVED && rotated) load<T, VEC, ALIGNED>(src(h0) + e1, x1);
  }

  // This position's cos/sin row, staged once in shared memory for every head of the block.
  extern __shared__ unsigned char smem_raw[];
  A* tc = reinterpret_cast<A*>(smem_raw);
  A* tsn = tc + rot;
  const C* cr = cos + b * tb + s * ts;
  const C* sr = sin + b * sb + s * ss;
  for (int i = threadIdx.x; i < rot; i += blockDim.x) {
    tc[i] = static_cast<A>(cr[i]);
    tsn[i] = static_cast<A>(sr[i]);
  }
  __syncthreads();

  for (int h = h0; h < heads; h += heads_per_iter) {
    T o0[VEC], o1[VEC];
    if (!rotated) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) o0[j] = x0[j];
    } else if constexpr (INTERLEAVED) {
#pragma unroll
      for (int j = 0; j < VEC; j += 2) {
        const A a = static_cast<A>(x0[j]), bb = static_cast<A>(x0[j + 1]);
        if constexpr (BWD) {
          o0[j] = T(a * tc[e0 + j] + bb * tsn[e0 + j + 1]);
          o0[j + 1] = T(bb * tc[e0 + j + 1] - a * tsn[e0 + j]);
        } else {
          o0[j] = T(a * tc[e0 + j] - bb * tsn[e0 + j]);
          o0[j + 1] = T(bb * tc[e0 + j + 1] + a * tsn[e0 + j + 1]);
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A a = static_cast<A>(x0[j]), bb = static_cast<A>(x1[j]);
        if constexpr (BWD) {
          // Transpose of the rotation: sin terms swap halves and sign.
          o0[j] = T(a * tc[e0 + j] + bb * tsn[e1 + j]);
          o1[j] = T(bb * tc[e1 + j] - a * tsn[e0 + j]);
        } else {
          o0[j] = T(a * tc[e0 + j] - bb * tsn[e0 + j]);
          o1[j] = T(bb * tc[e1 + j] + a * tsn[e1 + j]);
        }
      }
    }
    T* y = dst(h);
    const int hn = h + heads_per_iter;
    if (hn < heads) {  // next head's loads go out before this head's stores
      load<T, VEC, ALIGNED>(src(hn) + e0, x0, valid);
      if (!INTERLEAVED && rotated) load<T, VEC, ALIGNED>(src(hn) + e1, x1);
    }
    store<T, VEC, ALIGNED>(y + e0, o0, valid);
    if (!INTERLEAVED && rotated) store<T, VEC, ALIGNED>(y + e1, o1);
  }
}

template <typename T, typename C, int VEC, bool ALIGNED, bool BWD>
void launch_kernel(bool interleaved, const T* q, Strides qs, const T* k, Strides ks, const C* cp,
                   const C* sp, int64_t tb, int64_t ts, int64_t sb, int64_t ss, T* qo, T* ko,
                   const rope::Dims& dm, cudaStream_t stream) {
  const int rslots = interleaved ? dm.rot / VEC : dm.rot / 2 / VEC;
  const int slots = rslots + static_cast<int>(cuda::ceil_div(dm.head_dim - dm.rot, VEC));
  const int heads = static_cast<int>(dm.q_heads + dm.k_heads);
  const size_t smem = 2 * static_cast<size_t>(dm.rot) * sizeof(acc_t<T>);
  TORCH_CHECK(smem <= 48 * 1024, "metalcore.rope: rot too large");
  // Two heads per thread: the second head's loads overlap the first head's math and stores.
  const int per_iter = std::max(1, std::min<int>((heads + 1) / 2, 1024 / slots));
  const int threads = slots * per_iter;
  TORCH_CHECK(slots <= 1024, "metalcore.rope: head_dim too large");
  const int64_t blocks = dm.batch * dm.seq;
  TORCH_CHECK(blocks <= INT32_MAX, "metalcore.rope: batch * seq too large");
  const int seq = static_cast<int>(dm.seq), hq = static_cast<int>(dm.q_heads),
            hk = static_cast<int>(dm.k_heads), d = static_cast<int>(dm.head_dim),
            rot = static_cast<int>(dm.rot);
  if (interleaved) {
    rope_kernel<T, C, VEC, ALIGNED, true, BWD><<<blocks, threads, smem, stream>>>(
        q, qs, k, ks, cp, sp, tb, ts, sb, ss, qo, ko, seq, hq, hk, d, rot);
  } else {
    rope_kernel<T, C, VEC, ALIGNED, false, BWD><<<blocks, threads, smem, stream>>>(
        q, qs, k, ks, cp, sp, tb, ts, sb, ss, qo, ko, seq, hq, hk, d, rot);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  // cos/sin go through shared memory, so only q/k (and the outputs) need 16-byte alignment.
  const bool aligned = div(interleaved ? dm.rot : dm.rot / 2, V) && div(dm.head_dim - dm.rot, V) &&
                       div(dm.head_dim, V) && cuda::aligned16(qp) && cuda::aligned16(kp) &&
                       div(qs.b, V) && div(qs.h, V) && div(qs.s, V) && div(ks.b, V) &&
                       div(ks.h, V) && div(ks.s, V);
  T* qop = qo.mutable_data_ptr<T>();
  T* kop = ko.mutable_data_ptr<T>();
  const cudaStream_t stream = cuda::current_stream();
  if (aligned) {
    launch_kernel<T, C, V, true, BWD>(interleaved, qp, qs, kp, ks, cp, sp, tb, ts, sb, ss, qop, kop,
                                      dm, stream);
  } else if (interleaved) {
    launch_kernel<T, C, 2, false, BWD>(true, qp, qs, kp, ks, cp, sp, tb, ts, sb, ss, qop, kop, dm,
                                       stream);
  } else {
    launch_kernel<T, C, 1, false, BWD>(false, qp, qs, kp, ks, cp, sp, tb, ts, sb, ss, qop, kop, dm,
                                       stream);
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
