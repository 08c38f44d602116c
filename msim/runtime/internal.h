// Internal declarations shared by the msim runtime's translation units.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "msim_host.h"
#include "msim_kernel_abi.h"

namespace msim {

constexpr unsigned kSimdWidth = 32;

// One parsed kernel parameter (from the generator's signature string).
struct ParamInfo {
  std::string kind, index, space, type, name, cond;
};

struct KernelInfo {
  const __msim_kernel_desc* desc;
  std::vector<ParamInfo> params;
  std::string location;
};

const KernelInfo* find_kernel(const char* host_name);
const std::vector<KernelInfo>& all_kernels();
void note_dispatched(const std::string& host_name);

// Errors: the last report per OS thread, returned through msim_last_error().
void set_last_error(const std::string& msg);
int fail(const std::string& msg);  // sets the error, returns -1
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

enum class Order { kForward, kReverse, kRandom };
// ulp mode: how math functions with an MSL accuracy bound deviate from the correctly rounded
// result (see ulp.cpp): not at all, by a pseudo-random amount per input, or by the whole bound
// upwards or downwards.
enum class UlpMode { kOff, kRandom, kUp, kDown };

struct Options {
  Order lane_order = Order::kForward;
  Order tg_order = Order::kForward;
  uint64_t seed = 1;
  unsigned workers = 0;  // 0: one per core
  bool guard = true;
  bool uninit_check = false;
  bool order_check = false;
  size_t tg_mem_limit = 32768;
  unsigned max_threads = 1024;
  size_t stack_size = 64 * 1024;
  double timeout = 120.0;
  UlpMode ulp = UlpMode::kOff;
};
Options options_from_env();
int set_option(Options& o, const char* key, const char* value);

// One buffer binding as the host gave it.
struct Binding {
  bool bound = false;
  char* ptr = nullptr;  // host base pointer plus byte offset
  size_t length = 0;
  std::vector<char> bytes;  // owned copy for set_bytes
};

// A dispatch in flight: what workers need to run threadgroups and report the first error.
struct Dispatch {
  const KernelInfo* kernel = nullptr;
  Options opt;
  __msim_launch launch{};
  size_t tg_dyn_len[MSIM_MAX_BINDINGS] = {};
  bool tg_dyn_set[MSIM_MAX_BINDINGS] = {};  // a length was set, possibly 0
  unsigned tg_size[3] = {1, 1, 1};
  unsigned groups[3] = {1, 1, 1};
  unsigned grid_threads[3] = {1, 1, 1};  // total threads (edge groups may be partial)
  unsigned char poison = 0xFF;
  std::vector<uint32_t> tg_sequence;                   // linear threadgroup ids in execution order
  std::vector<std::pair<unsigned, double>> constants;  // function constant values
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mu;
  std::string error;
  uintptr_t fault_pc = 0;
  // Guard zones of shadow buffers, for naming the buffer an invalid access hit.
  struct Zone {
    uintptr_t lo, hi;  // the guard page range
    int index;         // buffer index (first of the group)
    uintptr_t data_lo, data_hi;
    bool before;  // guard page in front of the data
  };
  std::vector<Zone> zones;

  void report(const std::string& msg, uintptr_t pc = 0);
};

// ulp mode is counted process-wide so kernels skip the perturbation hook when no dispatch uses
// it; the hook itself reads the running dispatch's options.
void ulp_dispatch_begin(const Options& o);
void ulp_dispatch_end(const Options& o);

// Runs every threadgroup of `d` on worker threads; returns false if a detector fired.
bool run_grid(Dispatch& d);

// Symbolized "file:line" of a code address inside this library, or "".
std::string symbolize(uintptr_t pc);

}  // namespace msim
