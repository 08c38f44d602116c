// ulp mode: math functions whose accuracy the MSL specification bounds (exp, log, tanh, pow,
// precise:: and fast:: variants...) return a result anywhere within that bound, so a test passes
// only if its tolerance holds for every conforming GPU, not just for a correctly rounded libm.
//
// The deviation is a deterministic function of (seed, function, math mode, input bits), like a
// real implementation is a function of its input: the same call gives the same result in every
// thread and every run with the same seed.
#include <cmath>
#include <cstring>

#include "worker.h"

extern "C" {
// Number of dispatches running in ulp mode: kernels test it before calling the hook.
__attribute__((visibility("hidden"))) int __msim_ulp_on = 0;
}

namespace msim {
namespace {

uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t name_hash(const char* s) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (; *s; ++s) h = (h ^ (unsigned char)*s) * 0x100000001B3ull;
  return h;
}

// Distance between the two floats around x (the MSL definition of ulp(x) for a value that is
// not itself representable; for a float x, the gap above |x|).
double ulp_of(double x) {
  float f = (float)std::fabs(x);
  if (std::isinf(f)) f = 3.4028234663852886e38f;
  float up = std::nextafter(f, INFINITY);
  float down = std::nextafter(f, 0.0f);
  return (double)f <= std::fabs(x) ? (double)up - (double)f : (double)f - (double)down;
}

}  // namespace

void ulp_dispatch_begin(const Options& o) {
  if (o.ulp != UlpMode::kOff) __atomic_fetch_add(&__msim_ulp_on, 1, __ATOMIC_SEQ_CST);
}

void ulp_dispatch_end(const Options& o) {
  if (o.ulp != UlpMode::kOff) __atomic_fetch_sub(&__msim_ulp_on, 1, __ATOMIC_SEQ_CST);
}

}  // namespace msim

using namespace msim;

// `exact` is the function's value computed in double; the result is a float within `ulps`
// ulp of it (or within `abs_err` of it where the specification bounds the absolute error).
extern "C" __attribute__((visibility("hidden"))) float __msim_ulp_perturb(
    const char* fn, double exact, float ulps, float abs_err, unsigned in0, unsigned in1) {
  const float r = (float)exact;
  Worker* w = current_worker();
  if (!w || !w->d || w->d->opt.ulp == UlpMode::kOff) return r;
  if (!std::isfinite(exact) || !std::isfinite(r)) return r;  // special values stay exact
  const double allowed = abs_err > 0 ? (double)abs_err : std::floor(ulps) * ulp_of(exact);
  if (allowed <= 0) return r;
  double target;
  switch (w->d->opt.ulp) {
    case UlpMode::kUp:
      target = exact + allowed;
      break;
    case UlpMode::kDown:
      target = exact - allowed;
      break;
    default: {
      uint64_t h =
          mix64(w->d->opt.seed ^ mix64(name_hash(fn) ^ mix64(((uint64_t)in0 << 32) | in1)));
      const double u = (double)(h >> 11) * 0x1p-53 * 2.0 - 1.0;  // uniform in [-1, 1)
      target = exact + u * allowed;
    }
  }
  float out = (float)target;
  // Rounding the target may step just outside the bound: move back towards the exact value.
  while (std::fabs((double)out - exact) > allowed && out != r)
    out = std::nextafter(out, (double)out > exact ? -INFINITY : INFINITY);
  return out;
}
