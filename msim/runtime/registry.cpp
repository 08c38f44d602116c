// Kernel registry (filled by generated constructors) and dispatch coverage.
#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <set>

#include "internal.h"

namespace msim {
namespace {

std::vector<KernelInfo>& registry() {
  static std::vector<KernelInfo> r;
  return r;
}
std::string& registry_error() {
  static std::string e;
  return e;
}
// Leaked on purpose: the coverage flush runs from a static destructor and must still see them.
std::mutex& coverage_mu() {
  static auto* m = new std::mutex;
  return *m;
}
std::set<std::string>& coverage_set() {
  static auto* s = new std::set<std::string>;
  return *s;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find(sep, start);
    if (end == std::string::npos) end = s.size();
    out.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

// Appends the dispatched host names to $MSIM_COVERAGE_FILE when the library unloads.
struct CoverageFlusher {
  ~CoverageFlusher() {
    const char* path = getenv("MSIM_COVERAGE_FILE");
    if (path && *path) msim_coverage_write(path);
  }
} flusher;

}  // namespace

const std::vector<KernelInfo>& all_kernels() { return registry(); }

const KernelInfo* find_kernel(const char* host_name) {
  if (!registry_error().empty()) {
    fail(registry_error());
    return nullptr;
  }
  for (const auto& k : registry())
    if (host_name && std::string(k.desc->host_name) == host_name) return &k;
  fail(format("msim: no kernel with host name '%s' in this library", host_name ? host_name : ""));
  return nullptr;
}

void note_dispatched(const std::string& host_name) {
  std::lock_guard<std::mutex> lock(coverage_mu());
  coverage_set().insert(host_name);
}

}  // namespace msim

using namespace msim;

extern "C" {

void __msim_register(const __msim_kernel_desc* descs, int count) {
  for (int i = 0; i < count; ++i) {
    KernelInfo info;
    info.desc = &descs[i];
    info.location = format("%s:%d", descs[i].file, descs[i].line);
    for (const auto& p : split(descs[i].signature, ';')) {
      if (p.empty()) continue;
      auto f = split(p, '|');
      f.resize(6);
      info.params.push_back({f[0], f[1], f[2], f[3], f[4], f[5]});
    }
    for (const auto& k : registry())
      if (std::string(k.desc->host_name) == descs[i].host_name)
        registry_error() = format("msim: host name '%s' defined twice (%s and %s)",
                                  descs[i].host_name, k.location.c_str(), info.location.c_str());
    registry().push_back(std::move(info));
  }
}

#define MSIM_EXPORT __attribute__((visibility("default")))

MSIM_EXPORT int msim_abi_version(void) { return MSIM_ABI_VERSION; }
MSIM_EXPORT int msim_kernel_count(void) { return (int)registry().size(); }
MSIM_EXPORT const char* msim_kernel_name(int i) {
  return i >= 0 && i < (int)registry().size() ? registry()[i].desc->host_name : nullptr;
}
MSIM_EXPORT const char* msim_kernel_signature(int i) {
  return i >= 0 && i < (int)registry().size() ? registry()[i].desc->signature : nullptr;
}
MSIM_EXPORT const char* msim_kernel_location(int i) {
  return i >= 0 && i < (int)registry().size() ? registry()[i].location.c_str() : nullptr;
}
MSIM_EXPORT int msim_kernel_find(const char* host_name) {
  const KernelInfo* k = find_kernel(host_name);
  return k ? (int)(k - registry().data()) : -1;
}

MSIM_EXPORT const char* msim_coverage(void) {
  static thread_local std::string out;
  std::lock_guard<std::mutex> lock(coverage_mu());
  out.clear();
  for (const auto& n : coverage_set()) out += n + "\n";
  return out.c_str();
}

MSIM_EXPORT int msim_coverage_write(const char* path) {
  std::string text = msim_coverage();
  if (text.empty()) return 0;
  // O_APPEND with one write keeps lines from parallel test processes intact.
  int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (fd < 0) return fail(format("msim: cannot open coverage file %s", path));
  ssize_t n = write(fd, text.data(), text.size());
  close(fd);
  return n == (ssize_t)text.size() ? 0 : fail("msim: short write to coverage file");
}

}  // extern "C"
