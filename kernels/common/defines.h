// Definitions shared by Metal kernels and host C++: the same header compiles in both worlds, so
// host launch code and kernels cannot disagree on a constant or a parameter layout.
// Everything under kernels/ is C++14 (Metal 3.1): no nested namespace definitions or if constexpr.
#pragma once

// __METAL_VERSION__ is predefined by the Metal compiler (and by msim), never by host compilers.
#ifdef __METAL_VERSION__
#include <metal_stdlib>
#define METALCORE_CONSTEXPR constant constexpr
// 64-bit integers and device pointers stored in parameter structs (host side: plain integers).
#define METALCORE_U64 ulong
#define METALCORE_DEVICE_PTR(T) device T*
#else
#include <cstdint>
#define METALCORE_CONSTEXPR constexpr
#define METALCORE_U64 uint64_t
#define METALCORE_DEVICE_PTR(T) uint64_t
#endif

namespace metalcore {

// Apple GPUs (Apple7 and later) run 32-wide simdgroups. (The threadgroup limit is the
// pipeline's own, Encoder::max_threads_per_threadgroup, not a constant.)
METALCORE_CONSTEXPR unsigned kSimdWidth = 32;

inline constexpr unsigned ceil_div(unsigned a, unsigned b) { return (a + b - 1) / b; }
inline constexpr unsigned round_up(unsigned a, unsigned b) { return ceil_div(a, b) * b; }

}  // namespace metalcore
