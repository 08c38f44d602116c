// Guarded shadow buffers (see shadow.h).
#include "shadow.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

namespace msim {
namespace {

constexpr unsigned char kCanary = 0xFF;

std::string param_name(const Dispatch& d, int index) {
  for (const auto& p : d.kernel->params)
    if (p.kind == "buffer" && p.index == std::to_string(index)) return " '" + p.name + "'";
  return "";
}

}  // namespace

Shadows::~Shadows() {
  for (auto& g : groups_)
    if (g.map) munmap(g.map, g.map_len);
}

bool Shadows::build(const Binding* bindings, const std::vector<int>& used, Dispatch& d) {
  struct Item {
    char* p;
    size_t len;
    int index;
    bool bytes;
  };
  std::vector<Item> items;
  for (int i : used) {
    const Binding& b = bindings[i];
    bool is_bytes = !b.bytes.empty();
    items.push_back({is_bytes ? const_cast<char*>(b.bytes.data()) : b.ptr, b.length, i, is_bytes});
  }
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.p < b.p; });
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  for (size_t k = 0; k < items.size();) {
    // Overlapping bindings (in-place ops) share one copy so aliasing behaves as on the GPU.
    ShadowGroup g;
    g.host = items[k].p;
    char* hi = items[k].p + items[k].len;
    g.bytes = items[k].bytes;
    size_t j = k;
    while (j < items.size() && (j == k || items[j].p < hi)) {
      hi = std::max(hi, items[j].p + items[j].len);
      g.indices.push_back(items[j].index);
      ++j;
    }
    g.len = (size_t)(hi - g.host);
    const size_t data_pages = (g.len + 16 + page - 1) / page;
    g.map_len = (data_pages + 2) * page;
    void* m = mmap(nullptr, g.map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return false;
    g.map = static_cast<char*>(m);
    char* lo_page = g.map + page;
    char* hi_page = g.map + (1 + data_pages) * page;
    mprotect(g.map, page, PROT_NONE);
    mprotect(hi_page, page, PROT_NONE);
    // Keep the host address's alignment modulo 16 (vector loads need it); end as close to the
    // guard page as that allows.
    uintptr_t want = (uintptr_t)g.host % 16;
    uintptr_t start = (uintptr_t)hi_page - g.len;
    start -= ((start % 16) + 16 - want) % 16;
    g.data = reinterpret_cast<char*>(start);
    g.slack_lo = lo_page;
    g.slack_hi = g.data + g.len;
    memset(lo_page, kCanary, (size_t)(g.data - lo_page));
    memset(g.slack_hi, kCanary, (size_t)(hi_page - g.slack_hi));
    if (g.len) memcpy(g.data, g.host, g.len);
    for (size_t x = k; x < j; ++x)
      d.launch.buffers[items[x].index] = g.data + (items[x].p - g.host);
    d.zones.push_back({(uintptr_t)g.map, (uintptr_t)lo_page, items[k].index, (uintptr_t)g.data,
                       (uintptr_t)g.slack_hi, true});
    d.zones.push_back({(uintptr_t)hi_page, (uintptr_t)hi_page + page, items[k].index,
                       (uintptr_t)g.data, (uintptr_t)g.slack_hi, false});
    groups_.push_back(std::move(g));
    k = j;
  }
  return true;
}

std::string Shadows::check_canaries(const Dispatch& d) const {
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  for (const auto& g : groups_) {
    char* hi_page = g.map + g.map_len - page;
    for (char* p = g.slack_hi; p < hi_page; ++p)
      if ((unsigned char)*p != kCanary)
        return format(
            "msim: out-of-bounds write to buffer(%d)%s (bound length %zu bytes): %zu "
            "bytes past its end, in kernel '%s'",
            g.indices[0], param_name(d, g.indices[0]).c_str(), g.len, (size_t)(p - g.slack_hi),
            d.kernel->desc->host_name);
    for (char* p = g.slack_lo; p < g.data; ++p)
      if ((unsigned char)*p != kCanary)
        return format(
            "msim: out-of-bounds write to buffer(%d)%s: %zu bytes before its start, in "
            "kernel '%s'",
            g.indices[0], param_name(d, g.indices[0]).c_str(), (size_t)(g.data - p),
            d.kernel->desc->host_name);
  }
  return "";
}

std::string Shadows::compare(const Shadows& other, const Dispatch& d) const {
  for (size_t i = 0; i < groups_.size() && i < other.groups_.size(); ++i) {
    const ShadowGroup &a = groups_[i], &b = other.groups_[i];
    for (size_t k = 0; k < a.len; ++k)
      if (a.data[k] != b.data[k])
        return format("buffer(%d)%s differs at byte %zu", a.indices[0],
                      param_name(d, a.indices[0]).c_str(), k);
  }
  return "";
}

void Shadows::copy_back() const {
  for (const auto& g : groups_)
    if (!g.bytes && g.len && memcmp(g.host, g.data, g.len) != 0)  // read-only inputs stay untouched
      memcpy(g.host, g.data, g.len);
}

}  // namespace msim
