// Transcendental helpers missing from the Metal standard library (Metal only).
#pragma once

#include <metal_stdlib>

namespace metalcore {

// erfc(z) for z >= 0 with relative error below 1.2e-7 (Chebyshev fit of Numerical Recipes §6.2);
// no cancellation for large z, unlike 1 - erf(z).
inline float erfc_nonneg(float z) {
  const float t = 1.0f / (1.0f + 0.5f * z);
  const float poly =
      -1.26551223f +
      t * (1.00002368f +
           t * (0.37409196f +
                t * (0.09678418f +
                     t * (-0.18628806f +
                          t * (0.27886807f +
                               t * (-1.13520398f +
                                    t * (1.48851587f + t * (-0.82215223f + t * 0.17087277f))))))));
  return t * metal::precise::exp(-z * z + poly);
}

// 1 + erf(u), accurate in relative terms on both sides of zero (the GELU cdf times two).
inline float one_plus_erf(float u) { return u >= 0.0f ? 2.0f - erfc_nonneg(u) : erfc_nonneg(-u); }

inline float sigmoid(float x) { return 1.0f / (1.0f + metal::precise::exp(-x)); }

}  // namespace metalcore
