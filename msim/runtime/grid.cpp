// Grid execution: threadgroups are pulled from a shared sequence by worker OS threads.
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <thread>

#include "tsan.h"
#include "worker.h"

namespace msim {
namespace {

struct Watch {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::vector<pthread_t> workers;
};

void worker_loop(Dispatch* d, Watch* watch) {
  {
    std::lock_guard<std::mutex> lock(watch->mu);
    watch->workers.push_back(pthread_self());
  }
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
  {
    std::lock_guard<std::mutex> lock(watch->mu);  // no watchdog signal once this thread leaves
    auto& ws = watch->workers;
    ws.erase(std::find(ws.begin(), ws.end(), pthread_self()));
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
  Watch watch;
  // Watchdog: a thread spinning on memory nobody writes would hang forever; interrupt it.
  std::thread watchdog([&] {
    std::unique_lock<std::mutex> lock(watch.mu);
    auto limit = std::chrono::duration<double>(d.opt.timeout);
    if (d.opt.timeout <= 0 || watch.cv.wait_for(lock, limit, [&] { return watch.done; })) return;
    d.report(
        format("msim: kernel '%s' still running after %.0f s: deadlock or spin-wait on "
               "memory no other thread writes? (raise MSIM_TIMEOUT for long kernels)",
               d.kernel->desc->host_name, d.opt.timeout));
    for (pthread_t t : watch.workers) pthread_kill(t, timeout_signal());
  });
  ulp_dispatch_begin(d.opt);
  for (unsigned i = 1; i < n; ++i) extra.emplace_back(worker_loop, &d, &watch);
  worker_loop(&d, &watch);  // the calling thread works too
  for (auto& t : extra) t.join();
  ulp_dispatch_end(d.opt);
  {
    std::lock_guard<std::mutex> lock(watch.mu);
    watch.done = true;
  }
  watch.cv.notify_all();
  watchdog.join();
  return !d.failed.load();
}

}  // namespace msim
