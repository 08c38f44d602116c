// Cross-entropy forward and backward on CPU: one parallel task per block of rows, float32
// (float64) accumulation with at::vec. Forward: two passes over a row (max; then the sum of
// exponentials and the sum of logits together). Backward: the same two reductions, then one
// write pass, all three over a row that stays in L1/L2 after the first read.
#include "cross_entropy/cross_entropy_cpu_kernel.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "common/cpu_vec.h"

namespace metalcore::cpu::CPU_CAPABILITY {
namespace {

int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

template <typename A>
inline A nan_max(A m, A v) {
  return (std::isnan(v) || v > m) ? v : m;
}

// Max of a row, then sum(exp(x - max)) and (when wanted) sum(x). Tails are scalar: a zero-padded
// lane would count exp(0 - max) in the sum.
template <typename T>
struct RowStats {
  opmath_t<T> max, sum_exp, sum_x;
};

template <typename T>
RowStats<T> row_stats(const T* x, int64_t n, bool want_sum_x) {
  using acc_t = opmath_t<T>;
  using V = fvec<T>;
  constexpr int64_t C = chunk_len<T>();
  const int64_t full = n - n % C;
  auto vmax = [](V& a, V& b) { return at::vec::maximum(a, b); };
  auto vsum = [](V& a, V& b) { return a + b; };
  V m0(-std::numeric_limits<acc_t>::infinity()), m1 = m0;
  for (int64_t j = 0; j < full; j += C) {
    const Chunk<T> v = load_chunk(x + j);
    m0 = at::vec::maximum(m0, v.lo);
    m1 = at::vec::maximum(m1, v.hi);
  }
  acc_t mx = at::vec::vec_reduce_all<acc_t>(vmax, at::vec::maximum(m0, m1));
  for (int64_t j = full; j < n; ++j) mx = nan_max(mx, static_cast<acc_t>(x[j]));
  const V vmx(mx);
  BlockedSum<V> s0, s1, t0, t1;
  for (int64_t j = 0; j < full; j += C) {
    const Chunk<T> v = load_chunk(x + j);
    s0.add((v.lo - vmx).exp());
    s1.add((v.hi - vmx).exp());
    if (want_sum_x) {
      t0.add(v.lo);
      t1.add(v.hi);
    }
  }
  acc_t se = at::vec::vec_reduce_all<acc_t>(vsum, s0.total() + s1.total());
  acc_t sx = want_sum_x ? at::vec::vec_reduce_all<acc_t>(vsum, t0.total() + t1.total()) : acc_t(0);
  for (int64_t j = full; j < n; ++j) {
    const acc_t v = static_cast<acc_t>(x[j]);
    se += std::exp(v - mx);
    sx += v;
  }
  return {mx, se, sx};
}

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& target, int64_t ignore_index,
                  double smoothing, const at::Tensor& losses) {
  using acc_t = opmath_t<T>;
  const int64_t rows = x.size(0), n = x.size(1), xs = x.stride(0);
  const T* xp = x.const_data_ptr<T>();
  const int64_t* tp = target.const_data_ptr<int64_t>();
  acc_t* lp = losses.mutable_data_ptr<acc_t>();
  const acc_t eps = static_cast<acc_t>(smoothing);
  const bool smooth = smoothing > 0.0;
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = tp[row];
      if (t == ignore_index) {
        lp[row] = acc_t(0);
        continue;
      }
      const T* xr = xp + row * xs;
      const RowStats<T> st = row_stats(xr, n, smooth);
      // lse - x_t = log(sum) + (max - x_t): written this way, a logit far above log(sum) (a
      // large max) does not swallow log(sum) before the difference is taken.
      const acc_t log_sum = std::log(st.sum_exp);
      acc_t loss = (acc_t(1) - eps) * (log_sum + (st.max - static_cast<acc_t>(xr[t])));
      // + eps (lse - mean x); eps == 0 leaves the sum of x out (it may be -inf for masked
      // logits, and 0 * inf would be NaN).
      if (smooth) loss += eps * (log_sum + (st.max - st.sum_x / static_cast<acc_t>(n)));
      lp[row] = loss;
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& scale, const at::Tensor& x, const at::Tensor& target,
                   int64_t ignore_index, double smoothing, const at::Tensor& grad_in) {
  using acc_t = opmath_t<T>;
  using V = fvec<T>;
  constexpr int64_t C = chunk_len<T>();
  const int64_t rows = x.size(0), n = x.size(1), xs = x.stride(0);
  const T* xp = x.const_data_ptr<T>();
  const int64_t* tp = target.const_data_ptr<int64_t>();
  const acc_t* sp = scale.const_data_ptr<acc_t>();
  T* gp = grad_in.mutable_data_ptr<T>();
  const acc_t eps = static_cast<acc_t>(smoothing);
  const acc_t uniform = eps / static_cast<acc_t>(n);
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      T* gr = gp + row * n;
      const int64_t t = tp[row];
      if (t == ignore_index) {
        std::fill(gr, gr + n, T(0));
        continue;
      }
      const T* xr = xp + row * xs;
      const RowStats<T> st = row_stats(xr, n, false);
      const acc_t s = sp[row];
      // (softmax - eps / C) * scale, the scale applied last as in the formula, so an infinite
      // scale gives what the formula gives (inf * 0 = NaN where the term is 0).
      const V vmx(st.max), vinv(acc_t(1) / st.sum_exp), vu(uniform), vs(s);
      for (int64_t j = 0; j < n; j += C) {
        const int64_t c = std::min(C, n - j);
        const Chunk<T> v = load_chunk(xr + j, c, c == C);
        store_chunk(
            gr + j,
            Chunk<T>{((v.lo - vmx).exp() * vinv - vu) * vs, ((v.hi - vmx).exp() * vinv - vu) * vs},
            c);
      }
      // The target's own term, recomputed in opmath (not read back from the rounded store).
      const acc_t p_t = std::exp(static_cast<acc_t>(xr[t]) - st.max) / st.sum_exp;
      gr[t] = static_cast<T>((p_t - (acc_t(1) - eps) - uniform) * s);
    }
  });
}

}  // namespace

void cross_entropy_forward(const at::Tensor& x, const at::Tensor& target, int64_t ignore_index,
                           double smoothing, const at::Tensor& losses) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_forward",
      [&] { forward_impl<scalar_t>(x, target, ignore_index, smoothing, losses); });
}

void cross_entropy_backward(const at::Tensor& scale, const at::Tensor& x, const at::Tensor& target,
                            int64_t ignore_index, double smoothing, const at::Tensor& grad_in) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_backward",
      [&] { backward_impl<scalar_t>(scale, x, target, ignore_index, smoothing, grad_in); });
}

}  // namespace metalcore::cpu::CPU_CAPABILITY
