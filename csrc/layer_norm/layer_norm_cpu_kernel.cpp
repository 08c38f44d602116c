// LayerNorm forward/backward on CPU: one parallel task per block of rows, each row read from
// memory once (its later passes hit L1/L2), fp32 (or fp64) accumulation with at::vec.
//
// The variance is two-pass: the mean first, then the sum of (x - mean)^2. The one-pass
// E[x^2] - E[x]^2 cancels catastrophically when the mean is large against the spread (a row of
// 300 +- 0.01 in float32 loses every digit of its variance), and the extra pass reads a row
// that is already in cache.
#include "layer_norm/layer_norm_cpu_kernel.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "common/cpu_vec.h"

namespace metalcore::cpu::CPU_CAPABILITY {
namespace {

// Rows per parallel task: aim for ~32K elements so small rows do not drown in scheduling.
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

// x - mean on the first `count` lanes of a chunk, zero on the rest (tail lanes load as zero,
// and 0 - mean must not enter the sums).
template <typename T>
inline Chunk<T> centered(const Chunk<T>& v, const fvec<T>& mean, int64_t count) {
  using V = fvec<T>;
  constexpr int64_t L = vec_len<T>();
  Chunk<T> d{v.lo - mean, v.hi - mean};
  if (count < 2 * L) {
    const V zero(opmath_t<T>(0));
    d.lo = count >= L ? d.lo : V::set(zero, d.lo, count);
    d.hi = count <= L ? zero : V::set(zero, d.hi, count - L);
  }
  return d;
}

// First pass of the row statistics: the plain mean of n elements.
template <typename T>
inline opmath_t<T> row_mean(const T* src, int64_t n) {
  using acc_t = opmath_t<T>;
  using V = fvec<T>;
  constexpr int64_t C = chunk_len<T>();
  RowSum<T> s;
  for (int64_t j = 0; j < n; j += C) {
    const int64_t c = std::min(C, n - j);
    s.add(load_chunk(src + j, c, c == C));
  }
  return s.reduce() / static_cast<acc_t>(n);
}

// Mean and 1/sqrt(var + eps) of one row of n elements. Two passes, the second over
// d = x - mean0 with the corrected two-pass formula: mean = mean0 + sum(d) / n and
// var = sum(d^2) / n - (sum(d) / n)^2, which removes the rounding error of the first pass's
// mean to first order (what is left is the rounding of the mean itself to opmath).
template <typename T>
inline void row_stats(const T* src, int64_t n, opmath_t<T> eps, opmath_t<T>& mean_out,
                      opmath_t<T>& rstd_out) {
  using acc_t = opmath_t<T>;
  using V = fvec<T>;
  constexpr int64_t C = chunk_len<T>();
  const acc_t mean0 = row_mean(src, n);
  const V mv(mean0);
  RowSum<T> s, q;
  for (int64_t j = 0; j < n; j += C) {
    const int64_t c = std::min(C, n - j);
    const Chunk<T> d = centered<T>(load_chunk(src + j, c, c == C), mv, c);
    s.add(d);
    q.add(d, d);
  }
  // Divisions, not products with 1/n: a constant row's n equal offsets divide back exactly, so
  // its mean is exact and it normalises to exactly 0 (then y = bias).
  const acc_t nf = static_cast<acc_t>(n);
  const acc_t delta = s.reduce() / nf;
  const acc_t var = q.reduce() / nf - delta * delta;
  mean_out = mean0 + delta;
  rstd_out = acc_t(1) / std::sqrt(std::max(var, acc_t(0)) + eps);
}

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                  const at::Tensor& bias, double eps_d, const at::Tensor& out,
                  const at::Tensor& residual_out) {
  using acc_t = opmath_t<T>;
  using V = fvec<T>;
  constexpr int64_t C = chunk_len<T>();
  const int64_t rows = x.size(0), n = x.size(1);
  const T* xp = x.const_data_ptr<T>();
  const T* rp = residual.defined() ? residual.const_data_ptr<T>() : nullptr;
  const T* wp = weight.defined() ? weight.const_data_ptr<T>() : nullptr;
  const T* bp = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  T* op = out.mutable_data_ptr<T>();
  T* hp = residual_out.defined() ? residual_out.mutable_data_ptr<T>() : nullptr;
  const int64_t xs = x.stride(0), rs = rp ? residual.stride(0) : 0;
  const acc_t eps = static_cast<acc_t>(eps_d);

  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* src = xp + row * xs;
      if (rp != nullptr) {
        // The sum is rounded to T before it is normalised, as the unfused code would.
        const T* xr = src;
        const T* rr = rp + row * rs;
        T* hr = hp + row * n;
        for (int64_t j = 0; j < n; j += C) {
          const int64_t c = std::min(C, n - j);
          const Chunk<T> a = load_chunk(xr + j, c, c == C), b = load_chunk(rr + j, c, c == C);
          store_chunk(hr + j, Chunk<T>{a.lo + b.lo, a.hi + b.hi}, c);
        }
        src = hr;
      }
      acc_t mean_s, rstd_s;
      row_stats<T>(src, n, eps, mean_s, rstd_s);
      const V mean(mean_s), rstd(rstd_s);
      T* yr = op + row * n;
      for (int64_t j = 0; j < n; j += C) {
        const int64_t c = std::min(C, n - j);
        const bool full = c == C;
        const Chunk<T> v = load_chunk(src + j, c, full);
        Chunk<T> y{(v.lo - mean) * rstd, (v.hi - mean) * rstd};
        if (wp != nullptr) {
          const Chunk<T> w = load_chunk(wp + j, c, full);
          y = {y.lo * w.lo, y.hi * w.hi};
        }
        if (bp != nullptr) {
          const Chunk<T> b = load_chunk(bp + j, c, full);
          y = {y.lo + b.lo, y.hi + b.hi};
        }
        store_chunk(yr + j, y, c);
      }
    }
  });
}

// Adds v to the first `count` entries of an opmath partial row p (split at the vector width).
template <typename T>
inline void add_partial(opmath_t<T>* p, const Chunk<T>& v, int64_t count) {
  using V = fvec<T>;
  constexpr int64_t L = vec_len<T>();
  const int64_t c_lo = std::min(L, count), c_hi = count - c_lo;
  (V::loadu(p, c_lo) + v.lo).store(p, c_lo);
  if (c_hi > 0) (V::loadu(p + L, c_hi) + v.hi).store(p + L, c_hi);
}

template <typename T>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                   const at::Tensor& grad_residual, double eps_d, const at::Tensor& grad_input,
                   const at::Tensor& grad_weight, const at::Tensor& grad_bias) {
  using acc_t = opmath_t<T>;
  using V = fvec<T>;
  constexpr int64_t C = chunk_len<T>();
  const int64_t rows = x.size(0), n = x.size(1);
  const T* gp = grad_out.const_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  const T* wp = weight.defined() ? weight.const_data_ptr<T>() : nullptr;
  const T* grp = grad_residual.defined() ? grad_residual.const_data_ptr<T>() : nullptr;
  T* dxp = grad_input.mutable_data_ptr<T>();
  const int64_t gs = grad_out.stride(0), xs = x.stride(0);
  const int64_t grs = grp ? grad_residual.stride(0) : 0;
  const acc_t eps = static_cast<acc_t>(eps_d);
  const acc_t nf = static_cast<acc_t>(n), inv_n = acc_t(1) / nf;
  const bool want_dw = grad_weight.defined(), want_db = grad_bias.defined();

  // grad_weight = sum over rows of g * xhat, grad_bias = sum over rows of g. Rows are cut into
  // at most kMaxBlocks fixed blocks, each accumulating its own opmath partial rows (no atomics),
  // summed in block order afterwards: the blocks depend only on the shape, so the result is
  // bitwise the same for any thread count.
  constexpr int64_t kMaxBlocks = 64;
  const int64_t block_rows = std::max(row_grain(n), (rows + kMaxBlocks - 1) / kMaxBlocks);
  const int64_t nblocks = (rows + block_rows - 1) / block_rows;
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>());
  at::Tensor dw_partial, db_partial;
  acc_t* dwp = nullptr;
  acc_t* dbp = nullptr;
  if (want_dw) {
    dw_partial = at::zeros({nblocks, n}, acc_opts);
    dwp = dw_partial.mutable_data_ptr<acc_t>();
  }
  if (want_db) {
    db_partial = at::zeros({nblocks, n}, acc_opts);
    dbp = db_partial.mutable_data_ptr<acc_t>();
  }

  at::parallel_for(0, nblocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      acc_t* dw = dwp ? dwp + block * n : nullptr;
      acc_t* db = dbp ? dbp + block * n : nullptr;
      const int64_t begin = block * block_rows, end = std::min(rows, begin + block_rows);
      for (int64_t row = begin; row < end; ++row) {
        const T* gr = gp + row * gs;
        const T* xr = xp + row * xs;
        T* dxr = dxp + row * n;
        // Pass 1: the mean. Pass 2, over d = x - mean0: sum d, sum d^2, sum g*w and
        // sum g*w*d, corrected to the exact mean as in row_stats.
        const acc_t mean0 = row_mean(xr, n);
        const V mv0(mean0);
        RowSum<T> s, q, a, d;
        for (int64_t j = 0; j < n; j += C) {
          const int64_t c = std::min(C, n - j);
          const bool full = c == C;
          const Chunk<T> xc = centered<T>(load_chunk(xr + j, c, full), mv0, c);
          Chunk<T> gw = load_chunk(gr + j, c, full);
          if (wp != nullptr) {
            const Chunk<T> w = load_chunk(wp + j, c, full);
            gw = {gw.lo * w.lo, gw.hi * w.hi};
          }
          s.add(xc);
          q.add(xc, xc);
          a.add(gw);
          d.add(gw, xc);
        }
        const acc_t delta = s.reduce() / nf;
        const acc_t var = std::max(q.reduce() / nf - delta * delta, acc_t(0));
        const acc_t rstd_s = acc_t(1) / std::sqrt(var + eps);
        const acc_t sum_gw = a.reduce();
        // sum g*w*(x - mean) = sum g*w*d - delta * sum g*w. With an infinite g*w the
        // correction would turn the sum's inf into inf - inf; it is a rounding-sized term, so
        // it is skipped there and the row's infinities keep their signs.
        acc_t dot = d.reduce();
        if (std::isfinite(sum_gw)) dot -= delta * sum_gw;
        const V mean(mean0 + delta);
        // dx = rstd * (g*w - mean(g*w)) - (x - mean) * rstd^3 * mean(g*w*(x - mean))
        const V rstd(rstd_s), mean_gw(sum_gw * inv_n);
        const V coef(dot * rstd_s * rstd_s * rstd_s * inv_n);
        // Pass 3: dx, and this block's grad_weight / grad_bias partials.
        for (int64_t j = 0; j < n; j += C) {
          const int64_t c = std::min(C, n - j);
          const bool full = c == C;
          const Chunk<T> xv = load_chunk(xr + j, c, full);
          const Chunk<T> gv = load_chunk(gr + j, c, full);
          const Chunk<T> xc{xv.lo - mean, xv.hi - mean};
          Chunk<T> gw = gv;
          if (wp != nullptr) {
            const Chunk<T> w = load_chunk(wp + j, c, full);
            gw = {gv.lo * w.lo, gv.hi * w.hi};
          }
          if (dw != nullptr) {
            add_partial<T>(dw + j, Chunk<T>{gv.lo * (xc.lo * rstd), gv.hi * (xc.hi * rstd)}, c);
          }
          if (db != nullptr) add_partial<T>(db + j, gv, c);
          Chunk<T> dx = {(gw.lo - mean_gw) * rstd - xc.lo * coef,
                         (gw.hi - mean_gw) * rstd - xc.hi * coef};
          if (grp != nullptr) {
            const Chunk<T> gres = load_chunk(grp + row * grs + j, c, full);
            dx = {dx.lo + gres.lo, dx.hi + gres.hi};
          }
          store_chunk(dxr + j, dx, c);
        }
      }
    }
  });

  // Column sums over the blocks in a fixed order (at::sum may split a reduction by threads).
  auto reduce_blocks = [&](const at::Tensor& partial, const at::Tensor& result) {
    const acc_t* pp = partial.const_data_ptr<acc_t>();
    at::Tensor total = at::empty({n}, partial.options());
    acc_t* sp = total.mutable_data_ptr<acc_t>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) sp[j] = pp[j];
      for (int64_t b = 1; b < nblocks; ++b) {
        const acc_t* pb = pp + b * n;
        for (int64_t j = begin; j < end; ++j) sp[j] += pb[j];
      }
    });
    result.copy_(total);
  };
  if (want_dw) reduce_blocks(dw_partial, grad_weight);
  if (want_db) reduce_blocks(db_partial, grad_bias);
}

}  // namespace

void layer_norm_forward(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                        const at::Tensor& bias, double eps, const at::Tensor& out,
                        const at::Tensor& residual_out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_forward",
      [&] { forward_impl<scalar_t>(x, residual, weight, bias, eps, out, residual_out); });
}

void layer_norm_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& grad_residual, double eps, const at::Tensor& grad_input,
                         const at::Tensor& grad_weight, const at::Tensor& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_backward",
                                  [&] {
                                    backward_impl<scalar_t>(grad_out, x, weight, grad_residual, eps,
                                                            grad_input, grad_weight, grad_bias);
                                  });
}

}  // namespace metalcore::cpu::CPU_CAPABILITY
