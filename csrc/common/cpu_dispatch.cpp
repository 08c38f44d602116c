#include "common/cpu_dispatch.h"

#include <ATen/Version.h>

#include <string>

namespace metalcore::cpu {

static Capability detect() {
#if defined(__x86_64__) || defined(_M_X64)
  // Follow ATen's choice (it honours ATEN_CPU_CAPABILITY), but never beyond what this CPU and
  // our builds support.
  const std::string aten = at::get_cpu_capability();
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  if (aten.find("AVX512") != std::string::npos && avx512) return Capability::AVX512;
  if (aten.find("AVX2") != std::string::npos && avx2) return Capability::AVX2;
#endif
  return Capability::Default;
}

Capability capability() {
  static const Capability value = detect();
  return value;
}

}  // namespace metalcore::cpu
