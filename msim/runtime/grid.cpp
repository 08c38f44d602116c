// Grid execution: threadgroups are pulled from a shared sequence by worker OS threads.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <thread>

#include "tsan.h"
#include "worker.h"

namespace msim {
namespace {

void worker_loop(Dispatch* d) {
  // The fault handler runs on an alternate stack: a fiber stack overflow leaves none usable.
  static constexpr size_t kAltStack = 64 * 1024;
  std::vector<char> alt(kAltStack);
  stack_t ss{}, old{};
  ss.ss_sp = alt.data();
  ss.ss_size = kAltStack;
  sigaltstack(&ss, &old);
  {
    Worker w;
    w.d = d;
    w.tsan_main = tsan_current();
    set_current_worker(&w);
    while (!d->failed.load(std::memory_order_relaxed)) {
      size_t i = d->next.fetch_add(1);
      if (i >= d->tg_sequence.size()) break;
      w.run_threadgroup(d->tg_sequence[i]);
    }
    set_current_worker(nullptr);
  }
  if (old.ss_flags & SS_DISABLE) {
    stack_t off{};
    off.ss_flags = SS_DISABLE;
    sigaltstack(&off, nullptr);
  } else {
    sigaltstack(&old, nullptr);
  }
}

}  // namespace

bool run_grid(Dispatch& d) {
  install_fault_handlers();
  const size_t total = (size_t)d.groups[0] * d.groups[1] * d.groups[2];
  d.tg_sequence.resize(total);
  for (size_t i = 0; i < total; ++i)
    d.tg_sequence[i] = (uint32_t)(d.opt.tg_order == Order::kReverse ? total - 1 - i : i);
  if (d.opt.tg_order == Order::kRandom) {
    uint64_t s = d.opt.seed ^ 0xA5A5A5A5ull;
    for (size_t i = total; i > 1; --i) {
      s = s * 6364136223846793005ull + 1442695040888963407ull;
      std::swap(d.tg_sequence[i - 1], d.tg_sequence[(s >> 33) % i]);
    }
  }
  d.next = 0;
  unsigned n = d.opt.workers ? d.opt.workers : std::max(1u, std::thread::hardware_concurrency());
  n = (unsigned)std::min<size_t>(n, total);
  std::vector<std::thread> extra;
  for (unsigned i = 1; i < n; ++i) extra.emplace_back(worker_loop, &d);
  worker_loop(&d);  // the calling thread works too
  for (auto& t : extra) t.join();
  return !d.failed.load();
}

}  // namespace msim
