// Parameter struct shared by a kernel and its host code, the layout metalcore's kernel headers
// use: the same header compiles as MSL (under msim or Apple's compiler) and as host C++.
#pragma once
#ifdef __METAL_VERSION__
#include <metal_stdlib>
#define PARAMS_CONSTEXPR constant constexpr
#else
#include <cstdint>
typedef uint32_t uint;
#define PARAMS_CONSTEXPR constexpr
#endif

PARAMS_CONSTEXPR uint kScaleBlock = 64;

struct ScaleParams {
  uint n;
  float alpha;
  float beta;
};
