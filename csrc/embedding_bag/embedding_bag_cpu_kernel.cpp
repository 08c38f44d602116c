// embedding_bag forward/backward on CPU.
//
// Forward: one parallel task per block of bags; each bag accumulates its rows in at::vec
// registers, a tile of columns at a time (sum, mean), or compares them (max, where the first of
// equal values wins and a NaN, once taken, stays: torch's `item > current` rule).
//
// Backward: the weight gradient is owned per row. A counting sort of the positions by weight row
// (stable, so each row sees its positions in index order) lets one task sum everything a row
// receives, in a fixed order, with no atomics and no float reassociation between runs: the result
// is bitwise the same whatever the thread count.
#include "embedding_bag/embedding_bag_cpu_kernel.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/cpu_vec.h"

namespace metalcore::cpu::CPU_CAPABILITY {
namespace {

// Modes as embedding_bag::Mode (sum is the default branch).
constexpr int64_t kMean = 1, kMax = 2;

// Bags (or rows) per parallel task: ~32K touched elements per task.
int64_t grain_for(int64_t per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(per_item, 1));
}

// acc[0:d] += s * row[0:d], opmath accumulation.
template <typename T>
inline void axpy(opmath_t<T>* acc, const T* row, opmath_t<T> s, int64_t d) {
  using V = fvec<T>;
  constexpr int64_t L = vec_len<T>();
  const V sv(s);
  int64_t j = 0;
  for (; j + L <= d; j += L) {
    at::vec::fmadd(sv, vload(row + j), V::loadu(acc + j)).store(acc + j);
  }
  if (j < d) {
    const int64_t c = d - j;
    at::vec::fmadd(sv, vload(row + j, c), V::loadu(acc + j, c)).store(acc + j, c);
  }
}

// acc[0:d] += row[0:d] (the unweighted case: no multiply, so sums round as torch's adds do).
template <typename T>
inline void add_row(opmath_t<T>* acc, const T* row, int64_t d) {
  using V = fvec<T>;
  constexpr int64_t L = vec_len<T>();
  int64_t j = 0;
  for (; j + L <= d; j += L) (V::loadu(acc + j) + vload(row + j)).store(acc + j);
  if (j < d) {
    const int64_t c = d - j;
    (V::loadu(acc + j, c) + vload(row + j, c)).store(acc + j, c);
  }
}

// dst[0:d] = acc[0:d] / div (div == 1: a plain store).
template <typename T>
inline void store_row(T* dst, const opmath_t<T>* acc, opmath_t<T> div, int64_t d) {
  using V = fvec<T>;
  constexpr int64_t L = vec_len<T>();
  const V dv(div);
  const bool scale = div != opmath_t<T>(1);
  int64_t j = 0;
  for (; j + L <= d; j += L) {
    const V a = V::loadu(acc + j);
    vstore(dst + j, scale ? a / dv : a);
  }
  if (j < d) {
    const int64_t c = d - j;
    const V a = V::loadu(acc + j, c);
    vstore(dst + j, scale ? a / dv : a, c);
  }
}

// sum(a[0:d] * b[0:d]) in opmath.
template <typename T>
inline opmath_t<T> dot(const T* a, const T* b, int64_t d) {
  using V = fvec<T>;
  constexpr int64_t L = vec_len<T>();
  V acc(opmath_t<T>(0));
  int64_t j = 0;
  for (; j + L <= d; j += L) acc = at::vec::fmadd(vload(a + j), vload(b + j), acc);
  if (j < d) acc = at::vec::fmadd(vload(a + j, d - j), vload(b + j, d - j), acc);
  return at::vec::vec_reduce_all<opmath_t<T>>([](const V& x, const V& y) { return x + y; }, acc);
}

// The max of bag [lo, hi) per column into acc, and the row it came from into arg (-1: none).
// torch's rule: the first row sets, a later one replaces only when strictly greater, so the first
// of equal values wins and a NaN, once taken, stays.
template <typename T>
inline void bag_max(const T* w, const int64_t* idx, int64_t lo, int64_t hi, int64_t padding_idx,
                    int64_t d, opmath_t<T>* acc, int64_t* arg) {
  using acc_t = opmath_t<T>;
  std::fill(acc, acc + d, acc_t(0));
  std::fill(arg, arg + d, int64_t(-1));
  bool first = true;
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t r = idx[i];
    if (r == padding_idx) continue;
    const T* row = w + r * d;
    for (int64_t j = 0; j < d; ++j) {
      const acc_t x = static_cast<acc_t>(row[j]);
      if (first || x > acc[j]) {
        acc[j] = x;
        arg[j] = r;
      }
    }
    first = false;
  }
}

// Loads the part of a tile vector that lies inside the row: `count` <= 0 gives zeros.
template <typename T>
inline fvec<T> load_part(const T* p, int64_t count) {
  constexpr int64_t L = vec_len<T>();
  if (count >= L) return vload(p);
  if (count <= 0) return fvec<T>(opmath_t<T>(0));
  return vload(p, count);
}

// One bag's output, a tile of kTile vectors of columns at a time held in registers across the
// bag's rows (a row-wide accumulator buffer would be loaded and stored once per row). Every
// column still sums (or compares) its rows in index order: the same rounding as one running sum.
template <typename T>
inline void bag_forward(const T* w, const int64_t* idx, int64_t lo, int64_t hi, const T* ps,
                        int64_t padding_idx, int64_t d, int64_t mode, T* dst) {
  using acc_t = opmath_t<T>;
  using V = fvec<T>;
  constexpr int64_t L = vec_len<T>();
  constexpr int kTile = 4;
  int64_t count = 0;
  for (int64_t i = lo; i < hi; ++i) count += idx[i] != padding_idx;
  // An empty mean bag stays 0 (torch), not 0 / 0.
  const V div(mode == kMean && count > 0 ? static_cast<acc_t>(count) : acc_t(1));
  for (int64_t j0 = 0; j0 < d; j0 += kTile * L) {
    const int64_t c = std::min<int64_t>(kTile * L, d - j0);
    V a[kTile];
    for (int k = 0; k < kTile; ++k) a[k] = V(acc_t(0));
    bool first = true;
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t r = idx[i];
      if (r == padding_idx) continue;
      const T* row = w + r * d + j0;
      V x[kTile];
      if (c == kTile * L) {
        for (int k = 0; k < kTile; ++k) x[k] = vload(row + k * L);
      } else {
        for (int k = 0; k < kTile; ++k) x[k] = load_part(row + k * L, c - k * L);
      }
      if (mode == kMax) {
        // torch's rule: the first row sets, a later one replaces only where strictly greater
        // (x > a is false for NaN either side: a NaN, once taken, stays).
        for (int k = 0; k < kTile; ++k) a[k] = first ? x[k] : V::blendv(a[k], x[k], x[k] > a[k]);
        first = false;
      } else if (ps != nullptr) {
        const V s(static_cast<acc_t>(ps[i]));
        for (int k = 0; k < kTile; ++k) a[k] = at::vec::fmadd(s, x[k], a[k]);
      } else {
        for (int k = 0; k < kTile; ++k) a[k] = a[k] + x[k];
      }
    }
    for (int k = 0; k < kTile && k * L < c; ++k) {
      const V v = mode == kMean ? a[k] / div : a[k];
      vstore(dst + j0 + k * L, v, std::min<int64_t>(L, c - k * L));
    }
  }
}

template <typename T>
void forward_impl(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& bounds,
                  int64_t mode, const at::Tensor& psw, int64_t padding_idx, const at::Tensor& out) {
  const int64_t bags = out.size(0), d = out.size(1);
  const T* w = weight.const_data_ptr<T>();
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  const int64_t* bnd = bounds.const_data_ptr<int64_t>();
  const T* ps = psw.defined() ? psw.const_data_ptr<T>() : nullptr;
  T* o = out.mutable_data_ptr<T>();
  const int64_t avg = std::max<int64_t>(1, indices.size(0) / std::max<int64_t>(bags, 1));
  at::parallel_for(0, bags, grain_for(avg * d), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      bag_forward<T>(w, idx, bnd[b], bnd[b + 1], ps, padding_idx, d, mode, o + b * d);
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& indices,
                   const at::Tensor& bounds, int64_t mode, const at::Tensor& psw,
                   int64_t padding_idx, const at::Tensor& grad_weight, const at::Tensor& grad_psw) {
  using acc_t = opmath_t<T>;
  const int64_t bags = grad_out.size(0), d = grad_out.size(1);
  const int64_t v = grad_weight.size(0), n = indices.size(0);
  const T* g = grad_out.const_data_ptr<T>();
  const T* w = weight.const_data_ptr<T>();
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  const int64_t* bnd = bounds.const_data_ptr<int64_t>();
  const T* ps = psw.defined() ? psw.const_data_ptr<T>() : nullptr;

  // The bag of each position (-1 for none: defensive, the offsets cover every position), and each
  // bag's count of non-padding rows (the divisor of 'mean').
  std::vector<int64_t> bag_of(n, -1), count(bags, 0);
  for (int64_t b = 0; b < bags; ++b) {
    for (int64_t i = bnd[b]; i < bnd[b + 1]; ++i) {
      bag_of[i] = b;
      if (idx[i] != padding_idx) ++count[b];
    }
  }

  if (grad_psw.defined()) {
    T* gp = grad_psw.mutable_data_ptr<T>();
    at::parallel_for(0, n, grain_for(d), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = bag_of[i];
        gp[i] = b < 0 || idx[i] == padding_idx
                    ? T(0)
                    : static_cast<T>(dot<T>(g + b * d, w + idx[i] * d, d));
      }
    });
  }

  // Mode 'max': each bag's argmax rows, recomputed (the forward keeps no integer output).
  std::vector<int64_t> argmax(mode == kMax ? bags * d : 0);
  if (mode == kMax) {
    at::parallel_for(0, bags, grain_for(d), [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> acc(d);
      for (int64_t b = b0; b < b1; ++b) {
        bag_max<T>(w, idx, bnd[b], bnd[b + 1], padding_idx, d, acc.data(), argmax.data() + b * d);
      }
    });
  }
  const int64_t* mi = argmax.data();

  // Counting sort of the positions that reach a row: start[r] .. start[r + 1] in `order`.
  std::vector<int64_t> start(v + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (bag_of[i] >= 0 && idx[i] != padding_idx) ++start[idx[i] + 1];
  }
  for (int64_t r = 0; r < v; ++r) start[r + 1] += start[r];
  std::vector<int64_t> order(start[v]), fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    if (bag_of[i] >= 0 && idx[i] != padding_idx) order[fill[idx[i]]++] = i;
  }

  T* gw = grad_weight.mutable_data_ptr<T>();
  const int64_t avg =
      std::max<int64_t>(1, static_cast<int64_t>(order.size()) / std::max<int64_t>(v, 1));
  at::parallel_for(0, v, grain_for(avg * d), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> acc(d);
    for (int64_t r = r0; r < r1; ++r) {
      T* dst = gw + r * d;
      if (start[r] == start[r + 1]) {
        std::fill(dst, dst + d, T(0));
        continue;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      int64_t last_bag = -1;
      for (int64_t k = start[r]; k < start[r + 1]; ++k) {
        const int64_t i = order[k];
        const int64_t b = bag_of[i];
        const T* gb = g + b * d;
        if (mode == kMax) {
          // A row repeated within a bag took the max once: its gradient arrives once.
          if (b == last_bag) continue;
          last_bag = b;
          const int64_t* arg = mi + b * d;
          for (int64_t j = 0; j < d; ++j) {
            if (arg[j] == r) acc[j] += static_cast<acc_t>(gb[j]);
          }
        } else if (ps != nullptr) {
          axpy<T>(acc.data(), gb, static_cast<acc_t>(ps[i]), d);
        } else if (mode == kMean) {
          axpy<T>(acc.data(), gb, acc_t(1) / static_cast<acc_t>(count[b]), d);
        } else {
          add_row<T>(acc.data(), gb, d);
        }
      }
      store_row<T>(dst, acc.data(), acc_t(1), d);
    }
  });
}

}  // namespace

void embedding_bag_forward(const at::Tensor& weight, const at::Tensor& indices,
                           const at::Tensor& bounds, int64_t mode, const at::Tensor& psw,
                           int64_t padding_idx, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "metalcore.embedding_bag",
      [&] { forward_impl<scalar_t>(weight, indices, bounds, mode, psw, padding_idx, out); });
}

void embedding_bag_backward(const at::Tensor& grad_out, const at::Tensor& weight,
                            const at::Tensor& indices, const at::Tensor& bounds, int64_t mode,
                            const at::Tensor& psw, int64_t padding_idx,
                            const at::Tensor& grad_weight, const at::Tensor& grad_psw) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "metalcore.embedding_bag_backward", [&] {
        backward_impl<scalar_t>(grad_out, weight, indices, bounds, mode, psw, padding_idx,
                                grad_weight, grad_psw);
      });
}

}  // namespace metalcore::cpu::CPU_CAPABILITY
