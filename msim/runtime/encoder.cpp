// Host C ABI (msim_host.h): an encoder that validates a dispatch like Metal's API validation
// would, runs it, and turns detector findings into msim_last_error() reports.
#include <memory>

#include "shadow.h"

using namespace msim;

struct msim_encoder {
  Options opt = options_from_env();
  const KernelInfo* kernel = nullptr;
  Binding buffers[MSIM_MAX_BINDINGS];
  size_t tg_len[MSIM_MAX_BINDINGS] = {};
  bool tg_set[MSIM_MAX_BINDINGS] = {};
  std::vector<std::pair<unsigned, double>> constants;  // function constant values
};

namespace {

#define MSIM_EXPORT extern "C" __attribute__((visibility("default")))

int check_index(unsigned index, const char* what) {
  if (index < MSIM_MAX_BINDINGS) return 0;
  return fail(format("msim: %s index %u out of range (Metal allows 0..30)", what, index));
}

// Validation of everything Metal checks before running: limits, bindings, grid shape.
int prepare(msim_encoder* e, Dispatch& d, std::vector<int>& used) {
  const KernelInfo* k = e->kernel;
  if (!k) return fail("msim: dispatch without a pipeline (call msim_set_pipeline first)");
  const char* name = k->desc->host_name;
  size_t threads = (size_t)d.tg_size[0] * d.tg_size[1] * d.tg_size[2];
  size_t limit = e->opt.max_threads;
  if (k->desc->max_total_threads && k->desc->max_total_threads < limit)
    limit = k->desc->max_total_threads;
  if (threads == 0 || threads > limit)
    return fail(
        format("msim: threads per threadgroup %ux%ux%u = %zu exceeds the limit of %zu for "
               "kernel '%s'",
               d.tg_size[0], d.tg_size[1], d.tg_size[2], threads, limit, name));
  for (int i = 0; i < 3; ++i)
    if (d.grid_threads[i] == 0)
      return fail(format("msim: dispatch of kernel '%s' with an empty grid (%u,%u,%u)", name,
                         d.grid_threads[0], d.grid_threads[1], d.grid_threads[2]));
  size_t tg_total = 0;
  for (const auto& p : k->params) {
    int idx = p.kind == "id" ? -1 : std::stoi(p.index);
    if (!p.cond.empty()) {  // [[function_constant(c)]] parameter: exists only when c is true
      bool present = false;
      for (const auto& kv : e->constants)
        if (kv.first == (unsigned)std::stoul(p.cond)) present = kv.second != 0;
      if (!present) continue;
    }
    if (p.kind == "buffer") {
      if (!e->buffers[idx].bound)
        return fail(format("msim: kernel '%s' parameter '%s' [[buffer(%d)]] is not bound", name,
                           p.name.c_str(), idx));
      used.push_back(idx);
    } else if (p.kind == "threadgroup") {
      if (!e->tg_set[idx])
        return fail(
            format("msim: kernel '%s' parameter '%s' [[threadgroup(%d)]] has no "
                   "threadgroup memory length set",
                   name, p.name.c_str(), idx));
      d.tg_dyn_len[idx] = e->tg_len[idx];
      d.tg_dyn_set[idx] =
          true;  // 0 bytes is legal (ggml binds unused blocks so): any access faults
      tg_total += (e->tg_len[idx] + 15) & ~size_t(15);
    }
  }
  if (tg_total > e->opt.tg_mem_limit)
    return fail(
        format("msim: threadgroup memory limit exceeded for kernel '%s': "
               "[[threadgroup(i)]] lengths total %zu bytes > %zu bytes",
               name, tg_total, e->opt.tg_mem_limit));
  for (int i : used) d.launch.buffers[i] = e->buffers[i].ptr;
  return 0;
}

// One run over guarded shadows (or the host memory itself when guards are off).
std::unique_ptr<Shadows> run_once(msim_encoder* e, Dispatch& d, const std::vector<int>& used,
                                  unsigned char poison) {
  auto sh = std::make_unique<Shadows>();
  d.poison = poison;
  d.zones.clear();
  d.next = 0;
  if (d.opt.guard && !sh->build(e->buffers, used, d)) {
    d.report("msim: out of memory for guarded buffer copies");
    return sh;
  }
  if (!d.opt.guard)
    for (int i : used)
      d.launch.buffers[i] = e->buffers[i].bytes.empty()
                                ? e->buffers[i].ptr
                                : const_cast<char*>(e->buffers[i].bytes.data());
  if (run_grid(d) && d.opt.guard) {
    std::string oob = sh->check_canaries(d);
    if (!oob.empty()) d.report(oob);
  }
  return sh;
}

int dispatch(msim_encoder* e, const unsigned grid[3], const unsigned tg[3], bool by_threads) {
  if (!e) return fail("msim: null encoder");
  Dispatch d;
  d.opt = e->opt;
  for (int i = 0; i < 3; ++i) {
    d.tg_size[i] = tg[i];
    if (by_threads) {
      d.grid_threads[i] = grid[i];
      d.groups[i] = tg[i] ? (grid[i] + tg[i] - 1) / tg[i] : 0;
    } else {
      d.groups[i] = grid[i];
      d.grid_threads[i] = grid[i] * tg[i];
      if (tg[i] && grid[i] > 0xFFFFFFFFu / tg[i])
        return fail("msim: grid size overflows 32-bit thread positions");
    }
  }
  d.kernel = e->kernel;
  d.constants = e->constants;
  std::vector<int> used;
  if (prepare(e, d, used)) return -1;
  note_dispatched(d.kernel->desc->host_name);
  if (d.opt.uninit_check || d.opt.order_check) {
    d.opt.guard = true;  // reruns need pristine inputs: the host copy
    d.opt.workers = 1;   // and the same order of device atomics
  }
  auto first = run_once(e, d, used, 0xFF);
  const char* kname = d.kernel->desc->host_name;
  if (!d.failed && d.opt.uninit_check) {
    auto second = run_once(e, d, used, 0x00);
    std::string diff = d.failed ? "" : first->compare(*second, d);
    if (!diff.empty())
      d.report(
          format("msim: result depends on never-written threadgroup memory in kernel '%s': "
                 "%s when the poison byte changes (a read before any thread wrote it, or "
                 "a missing barrier)",
                 kname, diff.c_str()));
  }
  if (!d.failed && d.opt.order_check) {
    d.opt.lane_order = d.opt.lane_order == Order::kReverse ? Order::kForward : Order::kReverse;
    auto second = run_once(e, d, used, 0xFF);
    std::string diff = d.failed ? "" : first->compare(*second, d);
    if (!diff.empty())
      d.report(
          format("msim: result depends on the order threads run in kernel '%s': %s when "
                 "the lane order is reversed (missing barrier or racy threadgroup access?)",
                 kname, diff.c_str()));
  }
  if (d.failed) {
    std::string where = symbolize(d.fault_pc);
    return fail(where.empty() ? d.error : d.error + " at " + where);
  }
  if (d.opt.guard) first->copy_back();
  return 0;
}

}  // namespace

MSIM_EXPORT msim_encoder* msim_encoder_create(void) { return new msim_encoder(); }
MSIM_EXPORT void msim_encoder_destroy(msim_encoder* e) { delete e; }

MSIM_EXPORT int msim_set_pipeline(msim_encoder* e, const char* host_name) {
  if (!e) return fail("msim: null encoder");
  e->kernel = find_kernel(host_name);
  return e->kernel ? 0 : -1;
}

MSIM_EXPORT int msim_set_buffer(msim_encoder* e, unsigned index, void* ptr, size_t byte_offset,
                                size_t byte_length) {
  if (!e || check_index(index, "buffer")) return -1;
  if (!ptr && byte_length) return fail(format("msim: buffer(%u) is null", index));
  Binding& b = e->buffers[index];
  b.bound = true;
  b.bytes.clear();
  b.ptr = static_cast<char*>(ptr) + byte_offset;
  b.length = byte_length;
  return 0;
}

MSIM_EXPORT int msim_set_bytes(msim_encoder* e, unsigned index, const void* data, size_t length) {
  if (!e || check_index(index, "buffer")) return -1;
  if (!data || !length) return fail(format("msim: set_bytes(%u) needs data", index));
  if (length > 4096)
    return fail(
        format("msim: set_bytes(%u) of %zu bytes: Metal allows at most 4 KB", index, length));
  Binding& b = e->buffers[index];
  b.bound = true;
  b.bytes.assign(static_cast<const char*>(data), static_cast<const char*>(data) + length);
  b.ptr = b.bytes.data();
  b.length = length;
  return 0;
}

MSIM_EXPORT int msim_set_threadgroup_memory_length(msim_encoder* e, unsigned index, size_t length) {
  if (!e || check_index(index, "threadgroup")) return -1;
  e->tg_len[index] = length;
  e->tg_set[index] = true;
  return 0;
}

MSIM_EXPORT int msim_set_function_constant(msim_encoder* e, unsigned index, double value) {
  if (!e) return fail("msim: null encoder");
  for (auto& kv : e->constants)
    if (kv.first == index) {
      kv.second = value;
      return 0;
    }
  e->constants.emplace_back(index, value);
  return 0;
}

MSIM_EXPORT int msim_set_option(msim_encoder* e, const char* key, const char* value) {
  if (!e) return fail("msim: null encoder");
  return set_option(e->opt, key, value);
}

MSIM_EXPORT int msim_dispatch_threadgroups(msim_encoder* e, const unsigned grid[3],
                                           const unsigned tg[3]) {
  return dispatch(e, grid, tg, false);
}

MSIM_EXPORT int msim_dispatch_threads(msim_encoder* e, const unsigned grid[3],
                                      const unsigned tg[3]) {
  return dispatch(e, grid, tg, true);
}
