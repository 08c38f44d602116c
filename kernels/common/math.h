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

// e^z - 1 for every z (Metal has no expm1), with an accuracy that does not depend on exp's last
// ulps (Kahan's form). exp(z) - 1 amplifies exp's error by e^z / (e^z - 1): the MSL spec allows
// precise::exp 4 ulp, so the AdamW bias correction 1 - 0.9^1 could be 2.4e-6 off relatively on
// a conforming GPU. Here u = exp(z) carries that error, but u - 1 is exact for u in [0.5, 2]
// (Sterbenz) and (u - 1) / log(u) is a smooth function of u evaluated at that same u, so exp's
// error cancels to first order; what remains is log's (relative) error and two roundings.
// precise::log, not the fast one: fast log's error is absolute (2^-21 near 1), which would be
// huge relative to log(u) for u near 1.
inline float expm1(float z) {
  const float u = metal::precise::exp(z);
  if (u == 1.0f) return z;  // |z| below half an ulp of 1: e^z - 1 rounds to z
  const float um1 = u - 1.0f;
  if (um1 == -1.0f) return -1.0f;  // e^z below 2^-25 (or 0, z = -inf): -1 in float
  if (metal::isinf(u)) return u;   // overflow (z = +inf or beyond 88.7)
  return um1 * z / metal::precise::log(u);
}

}  // namespace metalcore
