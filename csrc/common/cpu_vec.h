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

// Rounds to T and back, so a value computed in opmath equals what a T tensor would hold.
template <typename T>
inline fvec<T> vround(const fvec<T>& v) {
  if constexpr (is_reduced_v<T>) {
    auto lo_hi = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v));
    return std::get<0>(lo_hi);
  } else {
    return v;
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

}  // namespace metalcore::cpu::CPU_CAPABILITY
