// Parallel, vectorised elementwise loop over contiguous arrays for the *_cpu_kernel.cpp files:
// f maps NIN opmath vectors to NOUT opmath vectors; loads and stores convert from/to T.
#pragma once

#include <ATen/Parallel.h>

#include <array>

#include "common/cpu_vec.h"

#ifndef CPU_CAPABILITY
#error "only for *_cpu_kernel.cpp files, which are compiled once per CPU_CAPABILITY"
#endif

// Everything here lives in the capability's namespace: these helpers take and return
// at::vec::Vectorized values, whose width differs per build (32 bytes for AVX2, 64 for AVX512).
// Shared across builds, one name would have several layouts: wherever the compiler did not
// inline them (an -O1 + ASan build did not), the linker kept one build's copy for all, and the
// AVX512 kernels read the upper half of every 16-bit chunk from an AVX2 helper (garbage).
namespace metalcore::cpu::CPU_CAPABILITY {

// Elements per parallel task: large enough to amortise scheduling, small enough to balance.
constexpr int64_t kElementwiseGrain = 32768;

template <typename T, size_t NIN, size_t NOUT, typename F>
void elementwise(int64_t n, const std::array<const T*, NIN>& in, const std::array<T*, NOUT>& out,
                 const F& f) {
  using V = fvec<T>;
  constexpr int64_t C = chunk_len<T>();
  at::parallel_for(0, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += C) {
      const int64_t c = std::min(C, end - i);
      std::array<V, NIN> lo, hi;
      for (size_t k = 0; k < NIN; ++k) {
        const Chunk<T> x = load_chunk(in[k] + i, c, c == C);
        lo[k] = x.lo;
        hi[k] = x.hi;
      }
      const std::array<V, NOUT> ylo = f(lo);
      const std::array<V, NOUT> yhi = f(hi);
      for (size_t k = 0; k < NOUT; ++k) store_chunk(out[k] + i, Chunk<T>{ylo[k], yhi[k]}, c);
    }
  });
}

}  // namespace metalcore::cpu::CPU_CAPABILITY
