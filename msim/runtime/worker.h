// Per-OS-thread execution state: the fiber scheduler that runs one threadgroup at a time.
#pragma once

#include <boost/context/detail/fcontext.hpp>

#include "internal.h"

namespace msim {

namespace ctx = boost::context::detail;

enum class LaneState : uint8_t { kRunnable, kBarrier, kSimd, kExited };

struct Lane {
  ctx::fcontext_t fctx = nullptr;
  LaneState state = LaneState::kRunnable;
  const char* file = nullptr;  // call site of the barrier or collective it waits at
  int line = 0;
  __msim_ids ids{};
  __msim_xchg result{};
  char* stack_top = nullptr;
  void* tsan_fiber = nullptr;
};

struct Worker {
  Dispatch* d = nullptr;
  ctx::fcontext_t sched = nullptr;  // scheduler context while a lane runs
  Lane* current = nullptr;
  bool in_lane = false;  // read by the signal handler
  bool abort = false;    // the running threadgroup hit a detector
  // The fault being reported, written by the signal handler. It lives here, not in its own
  // initial-exec thread_local: every msim library loaded into a process takes static TLS, of
  // which glibc keeps little for dlopen (about 16 libraries at 32 bytes each; 64 at 8).
  int fault_sig = 0;
  uintptr_t fault_addr = 0, fault_pc = 0;
  void* tsan_main = nullptr;
  char exit_token = 0;  // race mode: lanes release it on exit, the worker acquires it
  // Race mode: one sync address per barrier / simd-group generation (ring of two), so a lane
  // resuming late does not inherit what faster lanes did after the barrier.
  unsigned barrier_gen = 0;
  char barrier_sync[2] = {};
  std::vector<unsigned> simd_gen;
  std::vector<char> simd_sync;
  __msim_launch launch{};  // per-worker copy: threadgroup pointers point into this arena

  std::vector<Lane> lanes;
  unsigned n_lanes = 0;
  std::vector<unsigned char> slots;    // simd deposits: kSimdWidth-byte slot per lane
  std::vector<unsigned char> results;  // resolved snapshots, same layout
  std::vector<unsigned> order;

  // Fiber stacks: one mapping, a PROT_NONE guard page below each stack.
  char* stack_map = nullptr;
  size_t stack_map_len = 0, stack_stride = 0, stack_count = 0, stack_size = 0;

  // Threadgroup memory: one slot per variable or [[threadgroup(i)]] block, each ending at a
  // PROT_NONE page so indexing past the end faults; arena_used counts bytes against the limit.
  struct TgBlock {
    uintptr_t lo, hi;  // the block's bytes
    const char* file;  // declaration of a threadgroup variable, or null
    int line, index;   // index: the [[threadgroup(i)]] of a dynamic block, else -1
  };
  char* arena = nullptr;
  size_t arena_len = 0, arena_used = 0, slot_stride = 0, slot_data = 0;
  unsigned slot_count = 0, slots_used = 0;
  std::vector<TgBlock> tg_blocks;
  std::vector<std::pair<void*, void*>> tg_vars;  // generator key -> storage
  // Storage for one block at the end of a fresh slot (null when all slots are taken).
  char* tg_alloc(size_t size, size_t align, const char* file, int line, int index);

  ~Worker();
  void ensure_stacks(unsigned n, size_t size);
  void release_stacks();
  bool ensure_arena(size_t len);
  void run_threadgroup(uint32_t linear_tg);
};

Worker* current_worker();
void set_current_worker(Worker* w);
void install_fault_handlers();
int timeout_signal();  // sent by the watchdog to interrupt a lane that never yields
// Suspends the running lane and returns to its threadgroup's scheduler.
void switch_to_scheduler(Worker* w);
// Bookkeeping copies and fills that ThreadSanitizer must not attribute to a lane.
void poison_fill(void* p, unsigned char byte, size_t n);
void quiet_copy(void* dst, const void* src, size_t n);
// Leaves the running lane for good after a detector fired (never returns).
[[noreturn]] void abandon_lane(Worker* w);
std::string thread_desc(const __msim_ids& ids);

}  // namespace msim
