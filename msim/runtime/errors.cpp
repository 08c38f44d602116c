// Error reporting: thread-local last error and the first report of a dispatch.
#include <cstdarg>
#include <cstdio>

#include "internal.h"

namespace msim {

static thread_local std::string tls_last_error;

void set_last_error(const std::string& msg) { tls_last_error = msg; }

int fail(const std::string& msg) {
  set_last_error(msg);
  return -1;
}

std::string format(const char* fmt, ...) {
  char buf[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

void Dispatch::report(const std::string& msg, uintptr_t pc) {
  std::lock_guard<std::mutex> lock(error_mu);
  if (failed.load()) return;  // keep the first finding: later ones are usually consequences
  error = msg;
  fault_pc = pc;
  failed.store(true);
}

}  // namespace msim

extern "C" __attribute__((visibility("default"))) const char* msim_last_error(void) {
  return msim::tls_last_error.c_str();
}
