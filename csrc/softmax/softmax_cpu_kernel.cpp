// Softmax / log_softmax forward and backward on CPU, float32 (float64) accumulation with at::vec.
// Rows (inner == 1) are one parallel task each or a block of short rows: three passes per row
// (max, sum of exponentials, write), the second and third hitting L1/L2. Softmax over an inner
// dim (inner > 1) walks a chunk of inner columns at once, so every load is a contiguous vector
// and no transposed copy is made.
#include "softmax/softmax_cpu_kernel.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/cpu_vec.h"

namespace metalcore::cpu::CPU_CAPABILITY {
namespace {

// Parallel tasks of ~32K elements: short rows do not drown in scheduling.
int64_t grain(int64_t elements_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(elements_per_item, 1));
}

// NaN-propagating max (std::max would drop a NaN in `v`); a NaN row max gives a NaN row, as in
// torch.
template <typename A>
inline A nan_max(A m, A v) {
  return (std::isnan(v) || v > m) ? v : m;
}

template <typename T>
void forward_rows(const T* xp, T* yp, int64_t rows, int64_t n, bool log) {
  using acc_t = opmath_t<T>;
  using V = fvec<T>;
  constexpr int64_t C = chunk_len<T>();
  const int64_t full = n - n % C;
  auto vmax = [](V& a, V& b) { return at::vec::maximum(a, b); };
  auto vsum = [](V& a, V& b) { return a + b; };
  constexpr int64_t L = vec_len<T>();
  at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
    // 16-bit softmax keeps the row's exponentials in opmath here between passes 2 and 3
    // (recomputing them cost a third of the time; storing them rounded would cost accuracy).
    std::vector<acc_t> scratch(!log && is_reduced_v<T> ? n : 0);
    acc_t* buf = scratch.empty() ? nullptr : scratch.data();
    for (int64_t row = begin; row < end; ++row) {
      const T* x = xp + row * n;
      T* y = yp + row * n;
      // Pass 1: the row max (subtracted before exp, so no exponential overflows).
      V m0(-std::numeric_limits<acc_t>::infinity()), m1 = m0;
      for (int64_t j = 0; j < full; j += C) {
        const Chunk<T> v = load_chunk(x + j);
        m0 = at::vec::maximum(m0, v.lo);
        m1 = at::vec::maximum(m1, v.hi);
      }
      acc_t mx = at::vec::vec_reduce_all<acc_t>(vmax, at::vec::maximum(m0, m1));
      for (int64_t j = full; j < n; ++j) mx = nan_max(mx, static_cast<acc_t>(x[j]));
      // Pass 2: sum of exp(x - max). The exponentials are kept for pass 3: in the output
      // itself (float32, float64) or in the opmath scratch row (16-bit).
      const V vmx(mx);
      const bool keep = !log && !is_reduced_v<T>;
      BlockedSum<V> s0, s1;
      for (int64_t j = 0; j < full; j += C) {
        const Chunk<T> v = load_chunk(x + j);
        const Chunk<T> e = {(v.lo - vmx).exp(), (v.hi - vmx).exp()};
        if (keep) {
          store_chunk(y + j, e);
        } else if (buf != nullptr) {
          e.lo.store(buf + j);
          e.hi.store(buf + j + L);
        }
        s0.add(e.lo);
        s1.add(e.hi);
      }
      acc_t sum = at::vec::vec_reduce_all<acc_t>(vsum, s0.total() + s1.total());
      for (int64_t j = full; j < n; ++j) {
        const acc_t e = std::exp(static_cast<acc_t>(x[j]) - mx);
        sum += e;
        if (buf != nullptr) buf[j] = e;
      }
      // Pass 3: write. log_softmax is (x - max) - log(sum): subtracting max first keeps log(sum)
      // from vanishing next to a large max.
      if (log) {
        const acc_t ls = std::log(sum);
        const V vls(ls);
        for (int64_t j = 0; j < full; j += C) {
          const Chunk<T> v = load_chunk(x + j);
          store_chunk(y + j, Chunk<T>{(v.lo - vmx) - vls, (v.hi - vmx) - vls});
        }
        for (int64_t j = full; j < n; ++j) {
          y[j] = static_cast<T>((static_cast<acc_t>(x[j]) - mx) - ls);
        }
      } else {
        const acc_t inv = acc_t(1) / sum;
        const V vinv(inv);
        for (int64_t j = 0; j < full; j += C) {
          Chunk<T> e;
          if (keep) {
            e = load_chunk(y + j);
          } else if (buf != nullptr) {
            e = {V::loadu(buf + j), V::loadu(buf + j + L)};
          } else {
            const Chunk<T> v = load_chunk(x + j);
            e = {(v.lo - vmx).exp(), (v.hi - vmx).exp()};
          }
          store_chunk(y + j, Chunk<T>{e.lo * vinv, e.hi * vinv});
        }
        for (int64_t j = full; j < n; ++j) {
          const acc_t e = buf != nullptr ? buf[j] : std::exp(static_cast<acc_t>(x[j]) - mx);
          y[j] = static_cast<T>(e * inv);
        }
      }
    }
  });
}

// Softmax over dim 1 of [outer, n, inner] with inner > 1: each task owns a chunk of up to
// chunk_len inner columns of one outer index and walks the n rows of that strip three times.
// Lanes past the strip's width hold zeros and are never stored.
template <typename T>
void forward_columns(const T* xp, T* yp, int64_t outer, int64_t n, int64_t inner, bool log) {
  using acc_t = opmath_t<T>;
  using V = fvec<T>;
  constexpr int64_t C = chunk_len<T>();
  const int64_t blocks = (inner + C - 1) / C;
  at::parallel_for(0, outer * blocks, grain(n * C), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o = task / blocks, j0 = (task % blocks) * C;
      const int64_t c = std::min(C, inner - j0);
      const bool full = c == C;
      const T* x = xp + o * n * inner + j0;
      T* y = yp + o * n * inner + j0;
      Chunk<T> m = {V(-std::numeric_limits<acc_t>::infinity()),
                    V(-std::numeric_limits<acc_t>::infinity())};
      for (int64_t k = 0; k < n; ++k) {
        const Chunk<T> v = load_chunk(x + k * inner, c, full);
        m = {at::vec::maximum(m.lo, v.lo), at::vec::maximum(m.hi, v.hi)};
      }
      BlockedSum<V> s_lo, s_hi;
      for (int64_t k = 0; k < n; ++k) {
        const Chunk<T> v = load_chunk(x + k * inner, c, full);
        s_lo.add((v.lo - m.lo).exp());
        s_hi.add((v.hi - m.hi).exp());
      }
      const Chunk<T> s = {s_lo.total(), s_hi.total()};
      if (log) {
        const Chunk<T> ls = {s.lo.log(), s.hi.log()};
        for (int64_t k = 0; k < n; ++k) {
          const Chunk<T> v = load_chunk(x + k * inner, c, full);
          store_chunk(y + k * inner, Chunk<T>{(v.lo - m.lo) - ls.lo, (v.hi - m.hi) - ls.hi}, c);
        }
      } else {
        const Chunk<T> inv = {s.lo.reciprocal(), s.hi.reciprocal()};
        for (int64_t k = 0; k < n; ++k) {
          const Chunk<T> v = load_chunk(x + k * inner, c, full);
          store_chunk(y + k * inner,
                      Chunk<T>{(v.lo - m.lo).exp() * inv.lo, (v.hi - m.hi).exp() * inv.hi}, c);
        }
      }
    }
  });
}

// Backward over rows. softmax: dx = y * (g - sum(g * y)); log_softmax: dx = g - exp(y) * sum(g).
// Zero-padded tail chunks add nothing to either sum.
template <typename T>
void backward_rows(const T* gp, const T* yp, T* dxp, int64_t rows, int64_t n, bool log) {
  using acc_t = opmath_t<T>;
  using V = fvec<T>;
  constexpr int64_t C = chunk_len<T>();
  auto vsum = [](V& a, V& b) { return a + b; };
  at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* g = gp + row * n;
      const T* y = yp + row * n;
      T* dx = dxp + row * n;
      BlockedSum<V> s0, s1;
      for (int64_t j = 0; j < n; j += C) {
        const int64_t c = std::min(C, n - j);
        const Chunk<T> gv = load_chunk(g + j, c, c == C);
        if (log) {
          s0.add(gv.lo);
          s1.add(gv.hi);
        } else {
          const Chunk<T> yv = load_chunk(y + j, c, c == C);
          s0.fma(gv.lo, yv.lo);
          s1.fma(gv.hi, yv.hi);
        }
      }
      const V s(at::vec::vec_reduce_all<acc_t>(vsum, s0.total() + s1.total()));
      for (int64_t j = 0; j < n; j += C) {
        const int64_t c = std::min(C, n - j);
        const Chunk<T> gv = load_chunk(g + j, c, c == C);
        const Chunk<T> yv = load_chunk(y + j, c, c == C);
        const Chunk<T> d = log ? Chunk<T>{gv.lo - yv.lo.exp() * s, gv.hi - yv.hi.exp() * s}
                               : Chunk<T>{yv.lo * (gv.lo - s), yv.hi * (gv.hi - s)};
        store_chunk(dx + j, d, c);
      }
    }
  });
}

template <typename T>
void backward_columns(const T* gp, const T* yp, T* dxp, int64_t outer, int64_t n, int64_t inner,
                      bool log) {
  using acc_t = opmath_t<T>;
  using V = fvec<T>;
  constexpr int64_t C = chunk_len<T>();
  const int64_t blocks = (inner + C - 1) / C;
  at::parallel_for(0, outer * blocks, grain(n * C), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o = task / blocks, j0 = (task % blocks) * C;
      const int64_t c = std::min(C, inner - j0);
      const bool full = c == C;
      const int64_t base = o * n * inner + j0;
      BlockedSum<V> s_lo, s_hi;
      for (int64_t k = 0; k < n; ++k) {
        const Chunk<T> gv = load_chunk(gp + base + k * inner, c, full);
        if (log) {
          s_lo.add(gv.lo);
          s_hi.add(gv.hi);
        } else {
          const Chunk<T> yv = load_chunk(yp + base + k * inner, c, full);
          s_lo.fma(gv.lo, yv.lo);
          s_hi.fma(gv.hi, yv.hi);
        }
      }
      const Chunk<T> s = {s_lo.total(), s_hi.total()};
      for (int64_t k = 0; k < n; ++k) {
        const Chunk<T> gv = load_chunk(gp + base + k * inner, c, full);
        const Chunk<T> yv = load_chunk(yp + base + k * inner, c, full);
        const Chunk<T> d = log ? Chunk<T>{gv.lo - yv.lo.exp() * s.lo, gv.hi - yv.hi.exp() * s.hi}
                               : Chunk<T>{yv.lo * (gv.lo - s.lo), yv.hi * (gv.hi - s.hi)};
        store_chunk(dxp + base + k * inner, d, c);
      }
    }
  });
}

}  // namespace

void softmax_forward(const at::Tensor& x, bool log, const at::Tensor& out) {
  const int64_t outer = x.size(0), n = x.size(1), inner = x.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_forward",
                                  [&] {
                                    const auto* xp = x.const_data_ptr<scalar_t>();
                                    auto* yp = out.mutable_data_ptr<scalar_t>();
                                    if (inner == 1) {
                                      forward_rows<scalar_t>(xp, yp, outer, n, log);
                                    } else {
                                      forward_columns<scalar_t>(xp, yp, outer, n, inner, log);
                                    }
                                  });
}

void softmax_backward(const at::Tensor& grad_out, const at::Tensor& y, bool log,
                      const at::Tensor& grad_in) {
  const int64_t outer = y.size(0), n = y.size(1), inner = y.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "softmax_backward",
                                  [&] {
                                    const auto* gp = grad_out.const_data_ptr<scalar_t>();
                                    const auto* yp = y.const_data_ptr<scalar_t>();
                                    auto* dp = grad_in.mutable_data_ptr<scalar_t>();
                                    if (inner == 1) {
                                      backward_rows<scalar_t>(gp, yp, dp, outer, n, log);
                                    } else {
                                      backward_columns<scalar_t>(gp, yp, dp, outer, n, inner, log);
                                    }
                                  });
}

}  // namespace metalcore::cpu::CPU_CAPABILITY
