// CPU capability dispatch. Kernel files (*_cpu_kernel.cpp) are compiled once per capability into
// namespaces metalcore::cpu::DEFAULT and metalcore::cpu::AVX2 (see CMakeLists.txt); op files call
// METALCORE_CPU_DISPATCH(fn, args...) which picks the best one available on this machine.
#pragma once

namespace metalcore::cpu {

// True when the CPU has AVX2+FMA and ATEN_CPU_CAPABILITY does not ask for "default".
bool use_avx2();

}  // namespace metalcore::cpu

// Declares a family's kernel functions in every capability namespace.
#define METALCORE_DECLARE_CPU_KERNELS(DECLS) \
  namespace metalcore::cpu {                 \
  namespace DEFAULT {                        \
  DECLS                                      \
  }                                          \
  namespace AVX2 {                           \
  DECLS                                      \
  }                                          \
  }

#ifdef METALCORE_HAVE_AVX2
#define METALCORE_CPU_DISPATCH(fn, ...)                                   \
  (::metalcore::cpu::use_avx2() ? ::metalcore::cpu::AVX2::fn(__VA_ARGS__) \
                                : ::metalcore::cpu::DEFAULT::fn(__VA_ARGS__))
#else
#define METALCORE_CPU_DISPATCH(fn, ...) ::metalcore::cpu::DEFAULT::fn(__VA_ARGS__)
#endif
