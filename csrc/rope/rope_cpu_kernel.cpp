// RoPE forward/backward on CPU. Forward and backward are the same kernel: each pair (j, p) maps
// to y[j] = a*x[j] + b*x[p], y[p] = a'*x[p] + b'*x[j]; the backward (the transpose) only swaps
// and negates the sin coefficients. Tasks cover blocks of (batch, seq) positions; each block's
// coefficients are converted to opmath once and reused by every q and k head.
#include "rope/rope_cpu_kernel.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common/cpu_vec.h"

namespace metalcore::cpu::CPU_CAPABILITY {
namespace {

// Positions per block: their coefficients (2 * R opmath values each) take ~kBlockBytes, reread
// from L2/L3 while each head walks the block as one long contiguous run. Long runs (few memory
// streams at a time) measured ~2x faster than 16-position blocks on [B, H, S, D] inputs.
constexpr int64_t kBlockBytes = 1024 * 1024;

// Fills a (cos) and b (signed sin) of one position, indexed by slot: slot i < R/2 is the first
// element j of pair i (j = i, or 2i interleaved), slot R/2 + i its partner p (i + R/2, or 2i+1).
// Forward: y[j] = cos[j]*x[j] - sin[j]*x[p], y[p] = cos[p]*x[p] + sin[p]*x[j]. Transpose:
// g_x[j] = cos[j]*g[j] + sin[p]*g[p], g_x[p] = cos[p]*g[p] - sin[j]*g[j].
template <typename C, typename acc_t>
void fill_coefficients(const C* c, const C* s, int64_t rot, bool interleaved, bool transpose,
                       acc_t* a, acc_t* b) {
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < half; ++i) {
    const int64_t j = interleaved ? 2 * i : i;
    const int64_t p = interleaved ? 2 * i + 1 : i + half;
    const acc_t sj = static_cast<acc_t>(s[j]), sp = static_cast<acc_t>(s[p]);
    a[i] = static_cast<acc_t>(c[j]);
    a[half + i] = static_cast<acc_t>(c[p]);
    b[i] = transpose ? sp : -sj;
    b[half + i] = transpose ? -sj : sp;
  }
}

template <typename V>
inline V load_n(const typename V::value_type* p, int64_t c) {
  return c == V::size() ? V::loadu(p) : V::loadu(p, c);
}

// y[j] = a[j]*x1[j] + b[j]*x2[j] and y[h+j] = a[h+j]*x2[j] + b[h+j]*x1[j] for c lanes at j.
template <typename T, typename acc_t>
inline void rotate_half_step(const T* x, T* y, const acc_t* a, const acc_t* b, int64_t half,
                             int64_t j, int64_t c) {
  using V = fvec<T>;
  constexpr int64_t L = vec_len<T>();
  const V x1 = c == L ? vload(x + j) : vload(x + j, c);
  const V x2 = c == L ? vload(x + half + j) : vload(x + half + j, c);
  const V y1 = at::vec::fmadd(load_n<V>(a + j, c), x1, load_n<V>(b + j, c) * x2);
  const V y2 = at::vec::fmadd(load_n<V>(a + half + j, c), x2, load_n<V>(b + half + j, c) * x1);
  vstore(y + j, y1, c);
  vstore(y + half + j, y2, c);
}

// Non-interleaved: the two halves of the rotated part are contiguous, so both vectorise.
// 16-bit types go a full Vectorized<T> (two float vectors) at a time: whole-vector stores.
template <typename T, typename acc_t>
void rotate_half_row(const T* x, T* y, const acc_t* a, const acc_t* b, int64_t rot) {
  constexpr int64_t L = vec_len<T>();
  const int64_t half = rot / 2;
  int64_t j = 0;
  if constexpr (is_reduced_v<T>) {
    using VT = at::vec::Vectorized<T>;
    using V = fvec<T>;
    constexpr int64_t W = VT::size();
    static_assert(W == 2 * L);
    for (; j + W <= half; j += W) {
      auto [x1a, x1b] = at::vec::convert_to_float<T>(VT::loadu(x + j));
      auto [x2a, x2b] = at::vec::convert_to_float<T>(VT::loadu(x + half + j));
      const acc_t* a2 = a + half;
      const acc_t* b2 = b + half;
      const V y1a = at::vec::fmadd(V::loadu(a + j), x1a, V::loadu(b + j) * x2a);
      const V y1b = at::vec::fmadd(V::loadu(a + j + L), x1b, V::loadu(b + j + L) * x2b);
      const V y2a = at::vec::fmadd(V::loadu(a2 + j), x2a, V::loadu(b2 + j) * x1a);
      const V y2b = at::vec::fmadd(V::loadu(a2 + j + L), x2b, V::loadu(b2 + j + L) * x1b);
      at::vec::convert_from_float<T>(y1a, y1b).store(y + j);
      at::vec::convert_from_float<T>(y2a, y2b).store(y + half + j);
    }
  }
  for (; j < half; j += L) rotate_half_step(x, y, a, b, half, j, std::min(L, half - j));
}

// Interleaved: the pairs are split into even/odd lanes with deinterleave2 (the slot layout of
// the coefficients), rotated like the non-interleaved halves, and merged back with interleave2.
template <typename T, typename acc_t>
void rotate_pairs_row(const T* x, T* y, const acc_t* a, const acc_t* b, int64_t rot) {
  using V = fvec<T>;
  constexpr int64_t L = vec_len<T>();
  const int64_t half = rot / 2;
  const acc_t* a2 = a + half;
  const acc_t* b2 = b + half;
  int64_t i = 0;
  for (; i + L <= half; i += L) {
    V lo, hi;
    if constexpr (is_reduced_v<T>) {
      std::tie(lo, hi) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(x + 2 * i));
    } else {
      lo = V::loadu(x + 2 * i);
      hi = V::loadu(x + 2 * i + L);
    }
    auto [xe, xo] = at::vec::deinterleave2(lo, hi);
    const V ye = at::vec::fmadd(V::loadu(a + i), xe, V::loadu(b + i) * xo);
    const V yo = at::vec::fmadd(V::loadu(a2 + i), xo, V::loadu(b2 + i) * xe);
    std::tie(lo, hi) = at::vec::interleave2(ye, yo);
    if constexpr (is_reduced_v<T>) {
      at::vec::convert_from_float<T>(lo, hi).store(y + 2 * i);
    } else {
      lo.store(y + 2 * i);
      hi.store(y + 2 * i + L);
    }
  }
  for (; i < half; ++i) {
    const acc_t xe = static_cast<acc_t>(x[2 * i]), xo = static_cast<acc_t>(x[2 * i + 1]);
    y[2 * i] = static_cast<T>(a[i] * xe + b[i] * xo);
    y[2 * i + 1] = static_cast<T>(a2[i] * xo + b2[i] * xe);
  }
}

template <typename T>
struct Operand {
  const T* in;
  T* out;
  int64_t heads, stride_b, stride_h, stride_s;
};

template <typename T>
Operand<T> operand(const at::Tensor& x, const at::Tensor& out) {
  return {x.const_data_ptr<T>(),
          out.mutable_data_ptr<T>(),
          x.size(1),
          x.stride(0),
          x.stride(1),
          x.stride(2)};
}

template <typename T, typename C>
void rope_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
               const at::Tensor& sin, bool interleaved, bool transpose, const at::Tensor& q_out,
               const at::Tensor& k_out) {
  using acc_t = opmath_t<T>;
  const int64_t batch = q.size(0), seq = q.size(2), dim = q.size(3), rot = cos.size(2);
  const Operand<T> ops[2] = {operand<T>(q, q_out), operand<T>(k, k_out)};
  const C* cp = cos.const_data_ptr<C>();
  const C* sp = sin.const_data_ptr<C>();
  // A [1, S, R] table serves every batch entry.
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), cs = cos.stride(1);
  const int64_t sb = sin.size(0) == 1 ? 0 : sin.stride(0), ss = sin.stride(1);
  const int64_t per_position = std::max<int64_t>(1, (ops[0].heads + ops[1].heads) * dim);
  const int64_t grain = std::max<int64_t>(1, 32768 / per_position);

  const int64_t block = std::clamp<int64_t>(
      kBlockBytes / static_cast<int64_t>(2 * std::max<int64_t>(rot, 1) * sizeof(acc_t)), 1, 2048);

  at::parallel_for(0, batch * seq, grain, [&](int64_t begin, int64_t end) {
    const int64_t blk = std::min(block, end - begin);
    std::vector<acc_t> coef(2 * blk * rot);
    acc_t* a_blk = coef.data();
    acc_t* b_blk = a_blk + blk * rot;
    for (int64_t p0 = begin; p0 < end;) {
      const int64_t b = p0 / seq, s0 = p0 % seq;
      const int64_t n = std::min({end - p0, blk, seq - s0});
      for (int64_t i = 0; i < n; ++i) {
        fill_coefficients(cp + b * cb + (s0 + i) * cs, sp + b * sb + (s0 + i) * ss, rot,
                          interleaved, transpose, a_blk + i * rot, b_blk + i * rot);
      }
      auto row = [&](const Operand<T>& op, int64_t h, int64_t i) {
        const T* x = op.in + b * op.stride_b + h * op.stride_h + (s0 + i) * op.stride_s;
        T* y = op.out + ((b * op.heads + h) * seq + s0 + i) * dim;
        const acc_t* a = a_blk + i * rot;
        const acc_t* bb = b_blk + i * rot;
        if (interleaved) {
          rotate_pairs_row(x, y, a, bb, rot);
        } else {
          rotate_half_row(x, y, a, bb, rot);
        }
        // Partial rotary: features past rot pass through unchanged.
        if (rot < dim) std::copy(x + rot, x + dim, y + rot);
      };
      for (const Operand<T>& op : ops) {
        // Walk the input in memory order: heads outer for [B, H, S, D], positions outer for
        // [B, S, H, D] views (HF's projections), so reads stay sequential.
        if (op.stride_h >= op.stride_s) {
          for (int64_t h = 0; h < op.heads; ++h) {
            for (int64_t i = 0; i < n; ++i) row(op, h, i);
          }
        } else {
          for (int64_t i = 0; i < n; ++i) {
            for (int64_t h = 0; h < op.heads; ++h) row(op, h, i);
          }
        }
      }
      p0 += n;
    }
  });
}

}  // namespace

void rope_apply(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                const at::Tensor& sin, bool interleaved, bool transpose, const at::Tensor& q_out,
                const at::Tensor& k_out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope_apply", [&] {
    if (cos.scalar_type() == q.scalar_type()) {
      rope_impl<scalar_t, scalar_t>(q, k, cos, sin, interleaved, transpose, q_out, k_out);
    } else if constexpr (is_reduced_v<scalar_t>) {
      rope_impl<scalar_t, float>(q, k, cos, sin, interleaved, transpose, q_out, k_out);
    } else {
      TORCH_INTERNAL_ASSERT(false, "rope_apply: unsupported cos/sin dtype ", cos.scalar_type());
    }
  });
}

}  // namespace metalcore::cpu::CPU_CAPABILITY
