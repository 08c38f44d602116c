// CPU capability dispatch. Kernel files (*_cpu_kernel.cpp) are compiled once per capability into
// namespaces metalcore::cpu::{DEFAULT,AVX2,AVX512} (see CMakeLists.txt); op files call
// METALCORE_CPU_DISPATCH(fn, args...), which runs the build that matches the capability ATen
// itself uses on this machine (so ATEN_CPU_CAPABILITY=default/avx2 selects ours too).
#pragma once

namespace metalcore::cpu {

enum class Capability { Default, AVX2, AVX512 };

Capability capability();

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
  namespace AVX512 {                         \
  DECLS                                      \
  }                                          \
  }

#if defined(METALCORE_HAVE_AVX512)
#define METALCORE_CPU_DISPATCH(fn, ...)                                   \
  (::metalcore::cpu::capability() == ::metalcore::cpu::Capability::AVX512 \
       ? ::metalcore::cpu::AVX512::fn(__VA_ARGS__)                        \
   : ::metalcore::cpu::capability() == ::metalcore::cpu::Capability::AVX2 \
       ? ::metalcore::cpu::AVX2::fn(__VA_ARGS__)                          \
       : ::metalcore::cpu::DEFAULT::fn(__VA_ARGS__))
#else
#define METALCORE_CPU_DISPATCH(fn, ...) ::metalcore::cpu::DEFAULT::fn(__VA_ARGS__)
#endif
