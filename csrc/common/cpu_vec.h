// Small at::vec helpers for kernels that read/write float16, bfloat16, float32 or float64 and
// compute in opmath (float for the 16-bit types and float32, double for float64).
// Only included by *_cpu_kernel.cpp files, which are compiled once per CPU capability.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#ifndef CPU_CAPABILITY
#error "only for *_cpu_kernel.cpp files, which are compiled once per CPU_CAPABILITY"
#endif

// Everything here lives in the capability's namespace: these helpers take and return
// at::vec::Vectorized values, whose width differs per build (32 bytes for AVX2, 64 for AVX512).
// Shared across builds, one name would have several layouts: wherever the compiler did not
// inline them (an -O1 + ASan build did not), the linker kept one build's copy for all, and the
// AVX512 kernels read the upper half of every 16-bit chunk from an AVX2 helper (garbage).
namespace metalcore::cpu::CPU_CAPABILITY {

template <typename T>
using opmath_t = at::opmath_type<T>;
template <typename T>
using fvec = at::vec::Vectorized<opmath_t<T>>;

template <typename T>
constexpr bool is_reduced_v = std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>;

// Number of T elements processed per fvec.
template <typename T>
constexpr int64_t vec_len() {
  return fvec<T>::size();
}

template <typename T>
inline fvec<T> vload(const T* p) {
  if constexpr (is_reduced_v<T>) {
    fvec<T> out;
    at::vec::load_to_float<T>(p, out);
    return out;
  } else {
    return fvec<T>::loadu(p);
  }
}

// Loads `count` (< vec_len) elements; the rest of the vector is zero.
template <typename T>
inline fvec<T> vload(const T* p, int64_t count) {
  if constexpr (is_reduced_v<T>) {
    auto lo_hi = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, count));
    return std::get<0>(lo_hi);
  } else {
    return fvec<T>::loadu(p, count);
  }
}

template <typename T>
inline void vstore(T* p, const fvec<T>& v, int64_t count = vec_len<T>()) {
  if constexpr (is_reduced_v<T>) {
    at::vec::convert_from_float<T>(v, v).store(p, count);
  } else {
    v.store(p, count);
  }
}

// Kernels step through rows in chunks of two opmath vectors (16 floats with AVX2): for 16-bit
// types that is exactly one native vector load/store plus one conversion, instead of two
// half-width conversions.
template <typename T>
struct Chunk {
  fvec<T> lo, hi;
};

template <typename T>
constexpr int64_t chunk_len() {
  return 2 * vec_len<T>();
}

template <typename T>
inline Chunk<T> load_chunk(const T* p) {
  if constexpr (is_reduced_v<T>) {
    auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
    return {lo, hi};
  } else {
    return {fvec<T>::loadu(p), fvec<T>::loadu(p + vec_len<T>())};
  }
}

// Loads `count` (< chunk_len) elements; the rest of the chunk is zero.
template <typename T>
inline Chunk<T> load_chunk(const T* p, int64_t count) {
  if constexpr (is_reduced_v<T>) {
    auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, count));
    return {lo, hi};
  } else {
    constexpr int64_t L = vec_len<T>();
    if (count <= L) return {fvec<T>::loadu(p, count), fvec<T>(opmath_t<T>(0))};
    return {fvec<T>::loadu(p), fvec<T>::loadu(p + L, count - L)};
  }
}

template <typename T>
inline Chunk<T> load_chunk(const T* p, int64_t count, bool full) {
  return full ? load_chunk(p) : load_chunk(p, count);
}

template <typename T>
inline void store_chunk(T* p, const Chunk<T>& c, int64_t count = chunk_len<T>()) {
  if constexpr (is_reduced_v<T>) {
    at::vec::convert_from_float<T>(c.lo, c.hi).store(p, count);
  } else {
    constexpr int64_t L = vec_len<T>();
    if (count >= 2 * L) {
      c.lo.store(p);
      c.hi.store(p + L);
    } else if (count <= L) {
      c.lo.store(p, count);
    } else {
      c.lo.store(p);
      c.hi.store(p + L, count - L);
    }
  }
}

// Rounds a chunk to T and back (the value a T tensor would hold).
template <typename T>
inline Chunk<T> round_chunk(const Chunk<T>& c) {
  if constexpr (is_reduced_v<T>) {
    auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(c.lo, c.hi));
    return {lo, hi};
  } else {
    return c;
  }
}

// Row sums as a three-level cascade of vector partials. A running sum of a whole row per lane
// rounds n / lanes times into an ever larger total, and when the terms are alike every rounding
// leans the same way: a constant float32 row of 65536 elements came out 6e-6 off (50x PyTorch's
// own cascade sum), and the softmax of 32K equal terms 1e-5. Here each partial takes at most
// kFold additions before it is folded one level up, which keeps rows up to ~1M vectors within a
// few rounding units.
template <typename V>
struct BlockedSum {
  static constexpr int kFold = 16;
  using A = typename V::value_type;
  V inner = V(A(0)), mid = V(A(0)), outer = V(A(0));
  int count = 0, folds = 0;

  void add(const V& v) {
    inner = inner + v;
    if (++count == kFold) fold();
  }
  void fma(const V& a, const V& b) {
    inner = at::vec::fmadd(a, b, inner);
    if (++count == kFold) fold();
  }
  void fold() {
    mid = mid + inner;
    inner = V(A(0));
    count = 0;
    if (++folds == kFold) {
      outer = outer + mid;
      mid = V(A(0));
      folds = 0;
    }
  }
  V total() const { return outer + (mid + inner); }
};

// A row's sum of values or of products over chunks: two BlockedSums, i.e. two independent FMA
// chains in flight.
template <typename T>
struct RowSum {
  using V = fvec<T>;
  BlockedSum<V> lo, hi;

  void add(const Chunk<T>& x) {
    lo.add(x.lo);
    hi.add(x.hi);
  }
  void add(const Chunk<T>& x, const Chunk<T>& y) {
    lo.fma(x.lo, y.lo);
    hi.fma(x.hi, y.hi);
  }
  opmath_t<T> reduce() const {
    return at::vec::vec_reduce_all<opmath_t<T>>([](V& u, V& v) { return u + v; },
                                                lo.total() + hi.total());
  }
};

}  // namespace metalcore::cpu::CPU_CAPABILITY
