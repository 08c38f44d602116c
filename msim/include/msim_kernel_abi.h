// Contract between generated kernel code (compiled with the MSL shim, no standard headers)
// and the msim runtime. Plain C types only, so both sides agree without sharing a library.
#ifndef MSIM_KERNEL_ABI_H
#define MSIM_KERNEL_ABI_H

#define MSIM_MAX_BINDINGS 31  // Metal's per-stage limit for buffer and threadgroup indices
#define MSIM_XCHG_SLOT 32     // bytes per lane in a simd exchange (largest MSL vector: long4)

#ifdef __cplusplus
extern "C" {
#endif

// Thread coordinates of one simulated thread, as the MSL thread-position attributes see them.
typedef struct __msim_ids {
  unsigned thread_position_in_grid[3];
  unsigned thread_position_in_threadgroup[3];
  unsigned threadgroup_position_in_grid[3];
  unsigned threads_per_threadgroup[3];
  unsigned threadgroups_per_grid[3];
  unsigned threads_per_grid[3];
  unsigned thread_index_in_threadgroup;
  unsigned thread_index_in_simdgroup;
  unsigned simdgroup_index_in_threadgroup;
  unsigned threads_per_simdgroup;
  unsigned simdgroups_per_threadgroup;
  unsigned thread_index_in_quadgroup;
  unsigned quadgroup_index_in_threadgroup;
} __msim_ids;

// Arguments bound for one dispatch: [[buffer(i)]] and [[threadgroup(i)]] base pointers.
typedef struct __msim_launch {
  void* buffers[MSIM_MAX_BINDINGS];
  void* threadgroup[MSIM_MAX_BINDINGS];
} __msim_launch;

typedef void (*__msim_trampoline)(const __msim_launch*, const __msim_ids*);

// One dispatchable kernel (one per host name), emitted by the generator.
typedef struct __msim_kernel_desc {
  const char* host_name;
  __msim_trampoline entry;
  // "kind|index|address space|type|name|condition" per parameter, ';'-separated; condition is
  // the function constant index that makes the parameter exist, or empty.
  const char* signature;
  const char* file;
  int line;
  unsigned max_total_threads;  // [[max_total_threads_per_threadgroup]] or 0
} __msim_kernel_desc;

// Result of a simd-group exchange: every active lane's value, in lane order.
typedef struct __msim_xchg {
  const unsigned char* slots;  // MSIM_XCHG_SLOT bytes per lane, 32 lanes
  unsigned active_mask;        // lanes that took part (same call site, same time)
  unsigned lane;               // the caller's lane
  unsigned simd_size;          // threads in this simd-group
} __msim_xchg;

void __msim_register(const __msim_kernel_desc* descs, int count);
const __msim_ids* __msim_current_ids(void);
void __msim_threadgroup_barrier(const char* file, int line);
__msim_xchg __msim_simd_exchange(const void* value, unsigned nbytes, const char* file, int line);
void* __msim_tg_var(void* key, unsigned long size, unsigned long align, const char* file, int line);
void __msim_fatal(const char* what, const char* file, int line);
// Value of function constant `index` for the running dispatch (reports an error if unset).
double __msim_function_constant(unsigned index, const char* file, int line);
int __msim_function_constant_defined(unsigned index);

#ifdef __cplusplus
}
#endif
#endif
