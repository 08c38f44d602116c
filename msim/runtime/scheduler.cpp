// Fiber scheduler: runs one threadgroup's simulated threads round-robin on one OS thread and gives
// barriers and simd-group collectives their MSL semantics, reporting divergence.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "tsan.h"
#include "worker.h"

namespace msim {
namespace {

__attribute__((tls_model("initial-exec"))) thread_local Worker* tls_worker = nullptr;

size_t page_size() {
  static size_t p = (size_t)sysconf(_SC_PAGESIZE);
  return p;
}

void lane_main(ctx::transfer_t t) {
  Worker* w = static_cast<Worker*>(t.data);
  w->sched = t.fctx;
  Lane* lane = w->current;
  w->d->kernel->desc->entry(&w->launch, &lane->ids);
  lane->state = LaneState::kExited;
  // Race mode: orders this lane's reads of runtime memory before the worker frees it. Lanes never
  // acquire this token, so threadgroups stay unordered with respect to each other.
  tsan_release(&w->exit_token);
  switch_to_scheduler(w);
  __builtin_unreachable();
}

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::string site(const Lane& l) { return format("%s:%d", l.file ? l.file : "?", l.line); }

bool same_site(const Lane& a, const Lane& b) {
  if (a.line != b.line || !a.file || !b.file) return a.line == b.line && a.file == b.file;
  return a.file == b.file || strcmp(a.file, b.file) == 0;
}

}  // namespace

void switch_to_scheduler(Worker* w) {
  tsan_switch(w->tsan_main);
  ctx::transfer_t t = ctx::jump_fcontext(w->sched, nullptr);
  w->sched = t.fctx;
}

// Runtime bookkeeping writes. In race mode they must stay invisible to TSan: memset/memcpy are
// intercepted even from uninstrumented code and would be attributed to whichever fiber runs.
void poison_fill(void* p, unsigned char byte, size_t n) {
  if (kTsan) {
    volatile unsigned char* b = static_cast<unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) b[i] = byte;
  } else {
    memset(p, byte, n);
  }
}

void quiet_copy(void* dst, const void* src, size_t n) {
  if (kTsan) {
    volatile unsigned char* d = static_cast<unsigned char*>(dst);
    const unsigned char* s = static_cast<const unsigned char*>(src);
    for (size_t i = 0; i < n; ++i) d[i] = s[i];
  } else {
    memcpy(dst, src, n);
  }
}

Worker* current_worker() { return tls_worker; }
void set_current_worker(Worker* w) { tls_worker = w; }

std::string thread_desc(const __msim_ids& i) {
  return format("thread (%u,%u,%u) of threadgroup (%u,%u,%u) [thread_position_in_grid (%u,%u,%u)]",
                i.thread_position_in_threadgroup[0], i.thread_position_in_threadgroup[1],
                i.thread_position_in_threadgroup[2], i.threadgroup_position_in_grid[0],
                i.threadgroup_position_in_grid[1], i.threadgroup_position_in_grid[2],
                i.thread_position_in_grid[0], i.thread_position_in_grid[1],
                i.thread_position_in_grid[2]);
}

[[noreturn]] void abandon_lane(Worker* w) {
  w->current->state = LaneState::kExited;
  tsan_release(&w->exit_token);
  w->abort = true;
  switch_to_scheduler(w);
  __builtin_unreachable();
}

Worker::~Worker() {
  // Race mode: everything lanes read of this worker's memory happened before it is freed.
  // (Acquired only here: acquiring per threadgroup would order threadgroups after each other.)
  tsan_acquire(&exit_token);
  release_stacks();
  if (arena) munmap(arena, arena_len);
}

// Stack mappings outlive dispatches: fresh ones would cost a page fault per simulated thread.
struct StackMap {
  char* map;
  size_t len, count, size;
};
std::mutex& pool_mu() {
  static auto* m = new std::mutex;
  return *m;
}
std::vector<StackMap>& pool() {
  static auto* p = new std::vector<StackMap>;
  return *p;
}

void Worker::ensure_stacks(unsigned n, size_t size) {
  size = (size + page_size() - 1) & ~(page_size() - 1);
  if (stack_map && stack_count >= n && stack_size == size) return;
  release_stacks();
  if (!kTsan) {
    std::lock_guard<std::mutex> lock(pool_mu());
    for (size_t i = 0; i < pool().size(); ++i) {
      StackMap m = pool()[i];
      if (m.count >= n && m.size == size) {
        pool().erase(pool().begin() + i);
        stack_map = m.map, stack_map_len = m.len, stack_count = m.count, stack_size = m.size;
        stack_stride = size + page_size();
        return;
      }
    }
  }
  stack_size = size;
  stack_stride = size + page_size();
  stack_count = std::max<size_t>(n, 32);
  stack_map_len = stack_stride * stack_count;
  void* m = mmap(nullptr, stack_map_len, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) {
    stack_map = nullptr;
    return;
  }
  stack_map = static_cast<char*>(m);
  for (size_t i = 0; i < stack_count; ++i)
    mprotect(stack_map + i * stack_stride, page_size(), PROT_NONE);  // overflow guard
}

void Worker::release_stacks() {
  if (!stack_map) return;
  bool pooled = false;
  if (!kTsan) {  // race mode unmaps: that also resets TSan's shadow of the stacks
    std::lock_guard<std::mutex> lock(pool_mu());
    if (pool().size() < 8) {
      pool().push_back({stack_map, stack_map_len, stack_count, stack_size});
      pooled = true;
    }
  }
  if (!pooled) munmap(stack_map, stack_map_len);
  stack_map = nullptr;
  stack_count = 0;
}

bool Worker::ensure_arena(size_t limit) {
  constexpr unsigned kSlots = 32;  // threadgroup variables + dynamic blocks per kernel
  const size_t data = (limit + 16 + page_size() - 1) & ~(page_size() - 1);
  if (arena && slot_data == data && !kTsan) return true;
  if (arena) munmap(arena, arena_len);
  slot_data = data;
  slot_stride = data + page_size();
  slot_count = kSlots;
  arena_len = slot_stride * kSlots;
  void* m = mmap(nullptr, arena_len, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  arena = m == MAP_FAILED ? nullptr : static_cast<char*>(m);
  if (!arena) return false;
  for (unsigned i = 0; i < kSlots; ++i)
    mprotect(arena + i * slot_stride + slot_data, page_size(), PROT_NONE);
  return true;
}

char* Worker::tg_alloc(size_t size, size_t align, const char* file, int line, int index) {
  if (slots_used == slot_count) return nullptr;
  char* end = arena + (size_t)slots_used++ * slot_stride + slot_data;
  uintptr_t p = ((uintptr_t)end - size) & ~(uintptr_t)(align - 1);
  tg_blocks.push_back({p, p + size, file, line, index});
  poison_fill(reinterpret_cast<char*>(p), d->poison, size);
  return reinterpret_cast<char*>(p);
}

void Worker::run_threadgroup(uint32_t linear_tg) {
  Dispatch& D = *d;
  const unsigned g[3] = {linear_tg % D.groups[0], (linear_tg / D.groups[0]) % D.groups[1],
                         linear_tg / (D.groups[0] * D.groups[1])};
  unsigned sz[3];
  for (int k = 0; k < 3; ++k)  // edge threadgroups of dispatch_threads are partial
    sz[k] = std::min(D.tg_size[k], D.grid_threads[k] - g[k] * D.tg_size[k]);
  n_lanes = sz[0] * sz[1] * sz[2];
  const unsigned n_simd = (n_lanes + kSimdWidth - 1) / kSimdWidth;
  ensure_stacks(n_lanes, D.opt.stack_size);
  if (!stack_map || !ensure_arena(D.opt.tg_mem_limit)) {
    D.report("msim: out of memory for fiber stacks or threadgroup memory");
    return;
  }
  if (lanes.size() < n_lanes) lanes.resize(n_lanes);
  slots.resize((size_t)n_simd * kSimdWidth * MSIM_XCHG_SLOT);
  simd_gen.assign(n_simd, 0);
  simd_sync.resize((size_t)n_simd * 2);
  results.resize(slots.size());

  // Threadgroup memory: [[threadgroup(i)]] blocks first, poisoned so unwritten reads show.
  quiet_copy(&launch, &D.launch, sizeof launch);
  arena_used = 0;
  slots_used = 0;
  tg_vars.clear();
  tg_blocks.clear();
  for (int i = 0; i < MSIM_MAX_BINDINGS; ++i) {
    if (!D.tg_dyn_set[i]) continue;
    launch.threadgroup[i] = tg_alloc(D.tg_dyn_len[i], 16, nullptr, 0, i);
    arena_used += (D.tg_dyn_len[i] + 15) & ~size_t(15);
  }

  for (unsigned i = 0; i < n_lanes; ++i) {
    Lane& l = lanes[i];
    __msim_ids& id = l.ids;
    const unsigned local[3] = {i % sz[0], (i / sz[0]) % sz[1], i / (sz[0] * sz[1])};
    for (int k = 0; k < 3; ++k) {
      id.thread_position_in_threadgroup[k] = local[k];
      id.threadgroup_position_in_grid[k] = g[k];
      id.threads_per_threadgroup[k] = sz[k];
      id.threadgroups_per_grid[k] = D.groups[k];
      id.threads_per_grid[k] = D.grid_threads[k];
      id.thread_position_in_grid[k] = g[k] * D.tg_size[k] + local[k];
    }
    id.thread_index_in_threadgroup = i;
    id.thread_index_in_simdgroup = i % kSimdWidth;
    id.simdgroup_index_in_threadgroup = i / kSimdWidth;
    id.threads_per_simdgroup = std::min(kSimdWidth, n_lanes - (i / kSimdWidth) * kSimdWidth);
    id.simdgroups_per_threadgroup = n_simd;
    id.thread_index_in_quadgroup = i % 4;
    id.quadgroup_index_in_threadgroup = i / 4;
    l.state = LaneState::kRunnable;
    l.file = nullptr;
    l.line = 0;
    l.stack_top = stack_map + (size_t)(i + 1) * stack_stride;
    l.fctx = ctx::make_fcontext(l.stack_top, stack_size, lane_main);
    l.tsan_fiber = tsan_create();
  }
  order.resize(n_lanes);
  for (unsigned i = 0; i < n_lanes; ++i)
    order[i] = D.opt.lane_order == Order::kReverse ? n_lanes - 1 - i : i;
  uint64_t rng = D.opt.seed * 0x100000001B3ull + linear_tg;
  abort = false;

  unsigned exited = 0;
  while (!abort) {
    if (D.opt.lane_order == Order::kRandom)
      for (unsigned i = n_lanes; i > 1; --i) std::swap(order[i - 1], order[splitmix(rng) % i]);
    for (unsigned idx : order) {
      Lane& l = lanes[idx];
      if (l.state != LaneState::kRunnable) continue;
      current = &l;
      in_lane = true;
      tsan_switch(l.tsan_fiber);
      ctx::transfer_t t = ctx::jump_fcontext(l.fctx, this);
      l.fctx = t.fctx;
      in_lane = false;
      if (l.state == LaneState::kExited) ++exited;
      if (abort) break;
    }
    if (abort || exited == n_lanes) break;

    // Every live lane is blocked. Resolve simd collectives first: lanes of one simd-group at the
    // same call site form the active set (this is how divergent simd_sum etc. behave).
    bool resolved = false;
    for (unsigned sg = 0; sg < n_simd; ++sg) {
      const unsigned lo = sg * kSimdWidth, hi = std::min(n_lanes, lo + kSimdWidth);
      unsigned pending = 0;
      for (unsigned i = lo; i < hi; ++i)
        if (lanes[i].state == LaneState::kSimd) pending |= 1u << (i - lo);
      while (pending) {
        const Lane& first = lanes[lo + __builtin_ctz(pending)];
        unsigned mask = 0;
        for (unsigned b = pending; b; b &= b - 1) {
          unsigned i = lo + __builtin_ctz(b);
          if (same_site(lanes[i], first)) mask |= 1u << (i - lo);
        }
        pending &= ~mask;
        ++simd_gen[sg];
        unsigned char* res = &results[(size_t)lo * MSIM_XCHG_SLOT];
        for (unsigned b = mask; b; b &= b - 1) {
          unsigned i = lo + __builtin_ctz(b);
          quiet_copy(res + (i - lo) * MSIM_XCHG_SLOT, &slots[(size_t)i * MSIM_XCHG_SLOT],
                     MSIM_XCHG_SLOT);
        }
        for (unsigned b = mask; b; b &= b - 1) {
          unsigned i = lo + __builtin_ctz(b);
          lanes[i].result = __msim_xchg{res, mask, i - lo, hi - lo};
          lanes[i].state = LaneState::kRunnable;
        }
        resolved = true;
      }
    }
    if (resolved) continue;

    // Only threadgroup barriers remain: all live lanes must wait at the same one.
    const Lane* waiting = nullptr;
    unsigned n_wait = 0;
    for (unsigned i = 0; i < n_lanes; ++i)
      if (lanes[i].state == LaneState::kBarrier) {
        if (!waiting) waiting = &lanes[i];
        ++n_wait;
      }
    const char* kname = D.kernel->desc->host_name;
    if (exited) {
      const Lane* gone = nullptr;
      for (unsigned i = 0; i < n_lanes && !gone; ++i)
        if (lanes[i].state == LaneState::kExited) gone = &lanes[i];
      D.report(
          format("msim: barrier divergence in kernel '%s': %s returned while %u thread(s) "
                 "wait at threadgroup_barrier %s (every thread must reach every barrier; "
                 "early return before a barrier?)",
                 kname, thread_desc(gone->ids).c_str(), n_wait, site(*waiting).c_str()));
      break;
    }
    for (unsigned i = 0; i < n_lanes; ++i) {
      if (lanes[i].state == LaneState::kBarrier && !same_site(lanes[i], *waiting)) {
        unsigned n_other = 0;
        for (unsigned j = 0; j < n_lanes; ++j)
          n_other += lanes[j].state == LaneState::kBarrier && same_site(lanes[j], lanes[i]);
        D.report(format(
            "msim: barrier divergence in kernel '%s': threads wait at different "
            "barriers: %u at %s (e.g. %s) and %u at %s (e.g. %s)",
            kname, n_wait - n_other, site(*waiting).c_str(), thread_desc(waiting->ids).c_str(),
            n_other, site(lanes[i]).c_str(), thread_desc(lanes[i].ids).c_str()));
        abort = true;
        break;
      }
    }
    if (abort) break;
    for (unsigned i = 0; i < n_lanes; ++i) lanes[i].state = LaneState::kRunnable;
    ++barrier_gen;
  }
  for (unsigned i = 0; i < n_lanes; ++i) {
    if (lanes[i].tsan_fiber) tsan_destroy(lanes[i].tsan_fiber);
    lanes[i].tsan_fiber = nullptr;
  }
  if (kTsan) {  // fresh memory per threadgroup: reused stacks would look like cross-fiber races
    release_stacks();
    munmap(arena, arena_len);
    arena = nullptr;
  }
}

}  // namespace msim
