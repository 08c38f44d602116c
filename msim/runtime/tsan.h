// ThreadSanitizer fiber hooks. In race mode (MSIM_TSAN) every simulated thread is a TSan fiber and
// only barriers, simd collectives and atomics order memory accesses; otherwise these are no-ops.
#pragma once

#ifdef MSIM_TSAN
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
namespace msim {
constexpr bool kTsan = true;
inline void tsan_switch(void* fiber) { __tsan_switch_to_fiber(fiber, 1 /* no sync */); }
inline void tsan_acquire(void* a) { __tsan_acquire(a); }
inline void tsan_release(void* a) { __tsan_release(a); }
inline void* tsan_current() { return __tsan_get_current_fiber(); }
inline void* tsan_create() { return __tsan_create_fiber(0); }
inline void tsan_destroy(void* f) { __tsan_destroy_fiber(f); }
}  // namespace msim
#else
namespace msim {
constexpr bool kTsan = false;
inline void tsan_switch(void*) {}
inline void tsan_acquire(void*) {}
inline void tsan_release(void*) {}
inline void* tsan_current() { return nullptr; }
inline void* tsan_create() { return nullptr; }
inline void tsan_destroy(void*) {}
}  // namespace msim
#endif
