/* Host C ABI of an msim kernel library (a shared object built by msim/build.py).
 *
 * Mirrors Metal's compute encoder: pick a pipeline by host name, bind buffers by index with byte
 * offsets and lengths, set bytes and threadgroup memory lengths, then dispatch. Every function
 * returning int gives 0 on success and -1 on failure; msim_last_error() then holds the report
 * (detector findings included), so callers can raise it as an exception.
 *
 * Plain C, compilable by gcc and g++. Either link the library directly, or dlopen it and fill an
 * msim_api table with msim_api_load() (define MSIM_HOST_LOADER before including this header). */
#ifndef MSIM_HOST_H
#define MSIM_HOST_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MSIM_ABI_VERSION 1

typedef struct msim_encoder msim_encoder;

int msim_abi_version(void);

/* Kernel registry: every host name compiled into this library. */
int msim_kernel_count(void);
const char* msim_kernel_name(int i);
/* ';'-separated parameters, each "kind|index|address space|type|name" where kind is buffer,
 * threadgroup or id (index then names the thread-position attribute). */
const char* msim_kernel_signature(int i);
const char* msim_kernel_location(int i);     /* "file.metal:line" of the kernel */
int msim_kernel_find(const char* host_name); /* index, or -1 with an error if absent */

/* Encoder: bindings persist across dispatches, as on a Metal compute encoder. */
msim_encoder* msim_encoder_create(void);
void msim_encoder_destroy(msim_encoder* enc);
int msim_set_pipeline(msim_encoder* enc, const char* host_name);
int msim_set_buffer(msim_encoder* enc, unsigned index, void* ptr, size_t byte_offset,
                    size_t byte_length);
int msim_set_bytes(msim_encoder* enc, unsigned index, const void* data, size_t length);
int msim_set_threadgroup_memory_length(msim_encoder* enc, unsigned index, size_t length);
/* Function constant [[function_constant(index)]] for later dispatches (MTLFunctionConstantValues);
 * bool, integer and float constants all take their value as a double. */
int msim_set_function_constant(msim_encoder* enc, unsigned index, double value);
/* Options (defaults come from MSIM_* environment variables): lane_order and tg_order
 * (forward|reverse|random), seed, workers, guard (1: copy buffers next to guard pages),
 * uninit_check (1: rerun with a second poison pattern and compare), order_check (1: rerun with
 * the lane order reversed and compare), tg_mem_limit (bytes),
 * max_threads (per threadgroup), stack_size (bytes per simulated thread), timeout (seconds). */
int msim_set_option(msim_encoder* enc, const char* key, const char* value);
/* grid: threadgroups (dispatch_threadgroups) or threads (dispatch_threads, edge groups shrink). */
int msim_dispatch_threadgroups(msim_encoder* enc, const unsigned grid[3], const unsigned tg[3]);
int msim_dispatch_threads(msim_encoder* enc, const unsigned grid[3], const unsigned tg[3]);

/* Report of the last failing call on this OS thread ("" if none). */
const char* msim_last_error(void);

/* Coverage: host names dispatched so far by this process, '\n'-separated. They are also
 * appended to the file named by MSIM_COVERAGE_FILE when the library unloads. */
const char* msim_coverage(void);
int msim_coverage_write(const char* path);

#ifdef __cplusplus
}
#endif

#ifdef MSIM_HOST_LOADER
#include <dlfcn.h>
#include <stdio.h>

/* Function table for hosts that dlopen a kernel library instead of linking it. */
typedef struct msim_api {
  void* handle;
  int (*kernel_count)(void);
  const char* (*kernel_name)(int);
  const char* (*kernel_signature)(int);
  int (*kernel_find)(const char*);
  msim_encoder* (*encoder_create)(void);
  void (*encoder_destroy)(msim_encoder*);
  int (*set_pipeline)(msim_encoder*, const char*);
  int (*set_buffer)(msim_encoder*, unsigned, void*, size_t, size_t);
  int (*set_bytes)(msim_encoder*, unsigned, const void*, size_t);
  int (*set_threadgroup_memory_length)(msim_encoder*, unsigned, size_t);
  int (*set_function_constant)(msim_encoder*, unsigned, double);
  int (*set_option)(msim_encoder*, const char*, const char*);
  int (*dispatch_threadgroups)(msim_encoder*, const unsigned*, const unsigned*);
  int (*dispatch_threads)(msim_encoder*, const unsigned*, const unsigned*);
  const char* (*last_error)(void);
  const char* (*coverage)(void);
} msim_api;

/* Opens `path` and resolves every entry point; returns 0, or -1 with a message in err. */
static inline int msim_api_open(const char* path, msim_api* api, char* err, size_t errlen) {
  void* h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    snprintf(err, errlen, "msim: cannot open %s: %s", path, dlerror());
    return -1;
  }
  api->handle = h;
#define MSIM_SYM(field, name)                                                      \
  if (!(*(void**)& api->field = dlsym(h, name))) {                                 \
    snprintf(err, errlen, "msim: %s lacks %s (not an msim library?)", path, name); \
    return -1;                                                                     \
  }
  MSIM_SYM(kernel_count, "msim_kernel_count")
  MSIM_SYM(kernel_name, "msim_kernel_name")
  MSIM_SYM(kernel_signature, "msim_kernel_signature")
  MSIM_SYM(kernel_find, "msim_kernel_find")
  MSIM_SYM(encoder_create, "msim_encoder_create")
  MSIM_SYM(encoder_destroy, "msim_encoder_destroy")
  MSIM_SYM(set_pipeline, "msim_set_pipeline")
  MSIM_SYM(set_buffer, "msim_set_buffer")
  MSIM_SYM(set_bytes, "msim_set_bytes")
  MSIM_SYM(set_threadgroup_memory_length, "msim_set_threadgroup_memory_length")
  MSIM_SYM(set_function_constant, "msim_set_function_constant")
  MSIM_SYM(set_option, "msim_set_option")
  MSIM_SYM(dispatch_threadgroups, "msim_dispatch_threadgroups")
  MSIM_SYM(dispatch_threads, "msim_dispatch_threads")
  MSIM_SYM(last_error, "msim_last_error")
  MSIM_SYM(coverage, "msim_coverage")
#undef MSIM_SYM
  {
    int (*version)(void);
    *(void**)&version = dlsym(h, "msim_abi_version");
    if (!version || version() != MSIM_ABI_VERSION) {
      snprintf(err, errlen, "msim: %s has a different ABI version", path);
      return -1;
    }
  }
  return 0;
}
#endif /* MSIM_HOST_LOADER */

#endif /* MSIM_HOST_H */
