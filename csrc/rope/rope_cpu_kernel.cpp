// RoPE forward/backward on CPU. Forward and backward are the same kernel: per position, the map
// is out[j] = a[j] * x[j] + b[j] * x[partner(j)], and the backward (its transpose) only permutes
// and negates the sin coefficients. Tasks cover blocks of (batch, seq) positions; each block's
// coefficients are converted to opmath once and reused by every q and k head.
#include "rope/rope_cpu_kernel.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/cpu_vec.h"

namespace metalcore::cpu::CPU_CAPABILITY {
namespace {

// Positions whose coefficients are kept at once: 2 * 16 * R opmath values stay in L1.
constexpr int64_t kBlock = 16;

// Fills a (cos) and b (signed sin) of one position. Forward: out = a*x + b*x[partner], i.e.
// non-interleaved b[j] = -sin[j], b[j+h] = sin[j+h]; interleaved b[2i] = -sin[2i],
// b[2i+1] = sin[2i+1]. Transpose: grad_x[j] = cos[j]*g[j] + sin[p]*g[p] for j in the first
// slot of a pair (p its partner), grad_x[p] = cos[p]*g[p] - sin[j]*g[j].
template <typename C, typename acc_t>
void fill_coefficients(const C* c, const C* s, int64_t rot, bool interleaved, bool transpose,
                       acc_t* a, acc_t* b) {
  for (int64_t j = 0; j < rot; ++j) a[j] = static_cast<acc_t>(c[j]);
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < half; ++i) {
    const int64_t j = interleaved ? 2 * i : i;             // first slot of the pair
    const int64_t p = interleaved ? 2 * i + 1 : i + half;  // its partner
    const acc_t sj = static_cast<acc_t>(s[j]), sp = static_cast<acc_t>(s[p]);
    if (transpose) {
      b[j] = sp;
      b[p] = -sj;
    } else {
      b[j] = -sj;
      b[p] = sp;
    }
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

// T -> opmath for n elements (whole Vectorized<T> where possible).
template <typename T, typename acc_t>
void to_opmath(const T* x, acc_t* xf, int64_t n) {
  int64_t j = 0;
  if constexpr (is_reduced_v<T>) {
    using VT = at::vec::Vectorized<T>;
    constexpr int64_t W = VT::size();
    for (; j + W <= n; j += W) {
      auto [lo, hi] = at::vec::convert_to_float<T>(VT::loadu(x + j));
      lo.store(xf + j);
      hi.store(xf + j + W / 2);
    }
  }
  for (; j < n; ++j) xf[j] = static_cast<acc_t>(x[j]);
}

template <typename T, typename acc_t>
void from_opmath(const acc_t* yf, T* y, int64_t n) {
  int64_t j = 0;
  if constexpr (is_reduced_v<T>) {
    using VT = at::vec::Vectorized<T>;
    using V = fvec<T>;
    constexpr int64_t W = VT::size();
    for (; j + W <= n; j += W) {
      at::vec::convert_from_float<T>(V::loadu(yf + j), V::loadu(yf + j + W / 2)).store(y + j);
    }
  }
  for (; j < n; ++j) y[j] = static_cast<T>(yf[j]);
}

// Interleaved: the pair swap runs on an opmath copy of the row (a plain loop the compiler
// turns into shuffles), with vector conversions on either side.
template <typename T, typename acc_t>
void rotate_pairs_row(const T* x, T* y, const acc_t* a, const acc_t* b, int64_t rot, acc_t* xf,
                      acc_t* yf) {
  to_opmath(x, xf, rot);
  for (int64_t j = 0; j < rot; j += 2) {
    yf[j] = a[j] * xf[j] + b[j] * xf[j + 1];
    yf[j + 1] = a[j + 1] * xf[j + 1] + b[j + 1] * xf[j];
  }
  from_opmath(yf, y, rot);
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

  at::parallel_for(0, batch * seq, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> coef(2 * kBlock * rot + (interleaved ? 2 * rot : 0));
    acc_t* a_blk = coef.data();
    acc_t* b_blk = a_blk + kBlock * rot;
    acc_t* scratch = b_blk + kBlock * rot;
    for (int64_t p0 = begin; p0 < end;) {
      const int64_t b = p0 / seq, s0 = p0 % seq;
      const int64_t n = std::min({end - p0, kBlock, seq - s0});
      for (int64_t i = 0; i < n; ++i) {
        fill_coefficients(cp + b * cb + (s0 + i) * cs, sp + b * sb + (s0 + i) * ss, rot,
                          interleaved, transpose, a_blk + i * rot, b_blk + i * rot);
      }
      for (const Operand<T>& op : ops) {
        for (int64_t h = 0; h < op.heads; ++h) {
          const T* x = op.in + b * op.stride_b + h * op.stride_h + s0 * op.stride_s;
          T* y = op.out + ((b * op.heads + h) * seq + s0) * dim;
          for (int64_t i = 0; i < n; ++i, x += op.stride_s, y += dim) {
            const acc_t* a = a_blk + i * rot;
            const acc_t* bb = b_blk + i * rot;
            if (interleaved) {
              rotate_pairs_row(x, y, a, bb, rot, scratch, scratch + rot);
            } else {
              rotate_half_row(x, y, a, bb, rot);
            }
            // Partial rotary: features past rot pass through unchanged.
            if (rot < dim) std::copy(x + rot, x + dim, y + rot);
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
