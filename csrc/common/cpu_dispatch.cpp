#include "common/cpu_dispatch.h"

#include <cstdlib>
#include <cstring>

namespace metalcore::cpu {

static bool detect_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
  // Honour torch's own override so ATEN_CPU_CAPABILITY=default tests the portable path too.
  const char* env = std::getenv("ATEN_CPU_CAPABILITY");
  if (env != nullptr && std::strcmp(env, "default") == 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool use_avx2() {
  static const bool value = detect_avx2();
  return value;
}

}  // namespace metalcore::cpu
