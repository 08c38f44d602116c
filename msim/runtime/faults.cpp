// Fault handling: an invalid access or stack overflow inside a simulated thread becomes a
// dispatch error instead of killing the process. The handler rewrites the interrupted context
// so the thread resumes in fault_exit() on a fresh part of its own fiber stack.
#include <dlfcn.h>
#include <signal.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "worker.h"

namespace msim {
namespace {

[[maybe_unused]] struct sigaction old_segv, old_bus, old_fpe;

// Leaves a lane interrupted by the watchdog (the report is already filed).
[[noreturn]] void timeout_exit() { abandon_lane(current_worker()); }

void on_timeout(int, siginfo_t*, void* uc_void) {
  Worker* w = current_worker();
  if (!w || !w->in_lane) return;  // between threadgroups: the failed flag stops this worker
  auto* uc = static_cast<ucontext_t*>(uc_void);
  uintptr_t sp = (((uintptr_t)w->current->stack_top - 256) & ~(uintptr_t)15) - 8;
  uc->uc_mcontext.gregs[REG_RSP] = (greg_t)sp;
  uc->uc_mcontext.gregs[REG_RIP] = (greg_t)(uintptr_t)&timeout_exit;
}

std::string describe_address(Worker* w, uintptr_t addr) {
  Dispatch& D = *w->d;
  for (const auto& z : D.zones) {
    if (addr < z.lo || addr >= z.hi) continue;
    std::string name;
    for (const auto& p : D.kernel->params)
      if (p.kind == "buffer" && p.index == std::to_string(z.index)) name = " '" + p.name + "'";
    if (z.before)
      return format("out-of-bounds access to buffer(%d)%s: %zu bytes before its start", z.index,
                    name.c_str(), (size_t)(z.data_lo - addr));
    return format(
        "out-of-bounds access to buffer(%d)%s (bound length %zu bytes): %zu bytes past "
        "its end",
        z.index, name.c_str(), (size_t)(z.data_hi - z.data_lo), (size_t)(addr - z.data_hi));
  }
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  for (size_t i = 0; i < w->tg_blocks.size(); ++i) {
    const auto& b = w->tg_blocks[i];
    uintptr_t guard = (uintptr_t)w->arena + i * w->slot_stride + w->slot_data;
    if (addr < guard || addr >= guard + page) continue;
    std::string what = b.file ? format("threadgroup variable declared at %s:%d", b.file, b.line)
                              : format("[[threadgroup(%d)]] memory", b.index);
    return format("out-of-bounds access to %s (%zu bytes): %zu bytes past its end", what.c_str(),
                  (size_t)(b.hi - b.lo), (size_t)(addr - b.hi));
  }
  const Lane* l = w->current;
  uintptr_t stack_lo = (uintptr_t)l->stack_top - w->stack_stride;
  if (addr >= stack_lo - 65536 && addr < stack_lo + 4096 * 2)
    return format(
        "stack overflow (%zu KiB per simulated thread; large thread-local arrays? "
        "raise MSIM_STACK_SIZE)",
        w->stack_size / 1024);
  if (addr < 65536) return format("null pointer access (address 0x%zx; unbound buffer?)", addr);
  return format("invalid memory access at address 0x%zx", addr);
}

// Runs on the faulting fiber's stack (outside the signal handler), so it may allocate and lock.
[[noreturn, maybe_unused]] void fault_exit() {
  Worker* w = current_worker();
  std::string what;
  if (w->fault_sig == SIGFPE)
    what = "arithmetic exception (integer division by zero?)";
  else
    what = describe_address(w, w->fault_addr);
  w->d->report(format("msim: %s in kernel '%s', %s", what.c_str(), w->d->kernel->desc->host_name,
                      thread_desc(w->current->ids).c_str()),
               w->fault_pc);
  abandon_lane(w);
}

[[maybe_unused]] void on_fault(int sig, siginfo_t* si, void* uc_void) {
  Worker* w = current_worker();
  if (!w || !w->in_lane) {  // not ours: hand to whoever was installed before
    struct sigaction* old = sig == SIGSEGV ? &old_segv : sig == SIGBUS ? &old_bus : &old_fpe;
    if (old->sa_flags & SA_SIGINFO && old->sa_sigaction) {
      old->sa_sigaction(sig, si, uc_void);
      return;
    }
    if (old->sa_handler != SIG_DFL && old->sa_handler != SIG_IGN && old->sa_handler) {
      old->sa_handler(sig);
      return;
    }
    signal(sig, SIG_DFL);
    raise(sig);
    return;
  }
  auto* uc = static_cast<ucontext_t*>(uc_void);
  w->fault_sig = sig;
  w->fault_addr = (uintptr_t)si->si_addr;
  w->fault_pc = (uintptr_t)uc->uc_mcontext.gregs[REG_RIP];
  // Resume in fault_exit as if called, on the top of this lane's (abandoned) stack.
  uintptr_t sp = (((uintptr_t)w->current->stack_top - 256) & ~(uintptr_t)15) - 8;
  uc->uc_mcontext.gregs[REG_RSP] = (greg_t)sp;
  uc->uc_mcontext.gregs[REG_RIP] = (greg_t)(uintptr_t)&fault_exit;
}

}  // namespace

int timeout_signal() { return SIGRTMIN + 7; }

void install_fault_handlers() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_timeout;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(timeout_signal(), &sa, nullptr);
#ifndef MSIM_TSAN  // race mode leaves faults to ThreadSanitizer's own reporting
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &old_segv);
    sigaction(SIGBUS, &sa, &old_bus);
    sigaction(SIGFPE, &sa, &old_fpe);
#endif
  });
}

std::string symbolize(uintptr_t pc) {
  Dl_info info;
  if (!pc || !dladdr((void*)pc, &info) || !info.dli_fname) return "";
  const char* tool = getenv("MSIM_SYMBOLIZER");
  std::string cmd = format("%s --obj='%s' 0x%zx 2>/dev/null", tool ? tool : "llvm-symbolizer-19",
                           info.dli_fname, (size_t)(pc - (uintptr_t)info.dli_fbase));
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return "";
  char fn[512] = {0}, loc[1024] = {0};
  if (!fgets(fn, sizeof fn, p) || !fgets(loc, sizeof loc, p)) loc[0] = 0;
  pclose(p);
  std::string s(loc);
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
  if (s.empty() || s[0] == '?') return "";
  size_t colon = s.rfind(':');  // drop the column
  return colon != std::string::npos ? s.substr(0, colon) : s;
}

}  // namespace msim
