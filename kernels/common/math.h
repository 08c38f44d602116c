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

// e^z - 1 with a small relative error for every z (Metal has no expm1): exp(z) - 1 cancels for
// small |z|, where the Taylor series to z^7 is exact to float precision (next term < 3e-13).
inline float expm1(float z) {
  if (metal::fabs(z) < 0.1f) {
    return z * (1.0f +
                z * (0.5f + z * (1.0f / 6 + z * (1.0f / 24 +
                                                 z * (1.0f / 120 + z * (1.0f / 720 + z / 5040))))));
  }
  return metal::precise::exp(z) - 1.0f;
}

}  // namespace metalcore
