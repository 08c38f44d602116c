// Entry points called by generated kernel code (msim_kernel_abi.h): barriers, simd exchanges,
// threadgroup variables and function constants, all acting on the calling thread's worker.
#include <cstring>

#include "tsan.h"
#include "worker.h"

using namespace msim;

extern "C" {

const __msim_ids* __msim_current_ids(void) {
  Worker* w = current_worker();
  return w && w->current ? &w->current->ids : nullptr;
}

void __msim_threadgroup_barrier(const char* file, int line) {
  Worker* w = current_worker();
  Lane* l = w->current;
  l->state = LaneState::kBarrier;
  l->file = file;
  l->line = line;
  void* token = &w->barrier_sync[w->barrier_gen & 1];
  tsan_release(token);
  switch_to_scheduler(w);
  tsan_acquire(token);
}

__msim_xchg __msim_simd_exchange(const void* value, unsigned nbytes, const char* file, int line) {
  Worker* w = current_worker();
  Lane* l = w->current;
  const unsigned i = l->ids.thread_index_in_threadgroup;
  if (nbytes) quiet_copy(&w->slots[(size_t)i * MSIM_XCHG_SLOT], value, nbytes);
  l->state = LaneState::kSimd;
  l->file = file;
  l->line = line;
  const unsigned sg = i / kSimdWidth;
  void* token = &w->simd_sync[sg * 2 + (w->simd_gen[sg] & 1)];
  tsan_release(token);
  switch_to_scheduler(w);
  tsan_acquire(token);
  return l->result;
}

void* __msim_tg_var(void* key, unsigned long size, unsigned long align, const char* file,
                    int line) {
  Worker* w = current_worker();
  for (auto& kv : w->tg_vars)
    if (kv.first == key) return kv.second;
  align = align < 16 ? 16 : align;
  size_t off = (w->arena_used + align - 1) & ~(size_t)(align - 1);
  if (off + size > w->d->opt.tg_mem_limit) {
    w->d->report(format(
        "msim: threadgroup memory limit exceeded in kernel '%s' at %s:%d: %zu "
        "bytes needed (threadgroup variables + [[threadgroup(i)]] lengths) > "
        "%zu bytes",
        w->d->kernel->desc->host_name, file, line, off + (size_t)size, w->d->opt.tg_mem_limit));
    abandon_lane(w);
  }
  void* p = w->tg_alloc(size, align, file, line, -1);
  if (!p) {
    w->d->report(
        format("msim: kernel '%s' declares more threadgroup variables than msim's %u "
               "guarded slots (at %s:%d)",
               w->d->kernel->desc->host_name, w->slot_count, file, line));
    abandon_lane(w);
  }
  w->arena_used = off + size;
  w->tg_vars.emplace_back(key, p);
  return p;
}

double __msim_function_constant(unsigned index, const char* file, int line) {
  Worker* w = current_worker();
  if (!w || !w->in_lane) __builtin_trap();  // only kernels read function constants
  for (const auto& kv : w->d->constants)
    if (kv.first == index) return kv.second;
  w->d->report(
      format("msim: function constant %u used at %s:%d in kernel '%s' has no value "
             "(set it on the encoder, as MTLFunctionConstantValues would)",
             index, file, line, w->d->kernel->desc->host_name));
  abandon_lane(w);
}

int __msim_function_constant_defined(unsigned index) {
  Worker* w = current_worker();
  if (!w || !w->in_lane) __builtin_trap();
  for (const auto& kv : w->d->constants)
    if (kv.first == index) return 1;
  return 0;
}

void __msim_fatal(const char* what, const char* file, int line) {
  Worker* w = current_worker();
  if (!w || !w->in_lane) __builtin_trap();
  w->d->report(
      format("msim: %s at %s:%d (%s)", what, file, line, thread_desc(w->current->ids).c_str()));
  abandon_lane(w);
}

}  // extern "C"
