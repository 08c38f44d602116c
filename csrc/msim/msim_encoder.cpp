// msim Encoder: forwards every call to msim's plain-C host ABI (msim_host.h) of a kernel library
// opened with dlopen, and turns detector reports (races, out-of-bounds, divergence) into errors.
#include "msim/msim_encoder.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>

#define MSIM_HOST_LOADER
#include "msim_host.h"

namespace metalcore::msim {
namespace {

struct State {
  std::mutex mutex;
  std::string path;
  msim_api api{};
  bool loaded = false;
  std::map<std::string, std::string> options;
  uint32_t max_threads = 1024;
  // Reported only: msim itself always runs 32-lane simdgroups.
  uint32_t execution_width = kSimdWidth;
};

State& state() {
  static State s;
  return s;
}

const msim_api& api() {
  State& s = state();
  TORCH_CHECK(s.loaded, "metalcore_msim: no kernel library loaded (call load_kernels first)");
  return s.api;
}

void check(int rc, const char* what) {
  if (rc != 0) TORCH_CHECK(false, "msim ", what, ": ", api().last_error());
}

std::vector<std::string> split_lines(const char* text) {
  std::vector<std::string> out;
  std::istringstream in(text ? text : "");
  for (std::string line; std::getline(in, line);) {
    if (!line.empty()) out.push_back(line);
  }
  return out;
}

}  // namespace

void load_library(const std::string& path) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  if (s.loaded) {
    TORCH_CHECK(path == s.path, "metalcore_msim: kernel library already loaded from ", s.path);
    return;
  }
  char err[1024] = {0};
  TORCH_CHECK(msim_api_open(path.c_str(), &s.api, err, sizeof(err)) == 0, err);
  s.path = path;
  s.loaded = true;
}

void set_option(const std::string& key, const std::string& value) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  if (key == "execution_width") {
    s.execution_width = static_cast<uint32_t>(std::stoul(value));
    return;  // not an msim option: msim's simdgroups stay 32 wide
  }
  if (key == "max_threads") s.max_threads = static_cast<uint32_t>(std::stoul(value));
  s.options[key] = value;
}

std::vector<std::string> library_kernel_names() {
  std::vector<std::string> names;
  for (int i = 0; i < api().kernel_count(); ++i) names.emplace_back(api().kernel_name(i));
  return names;
}

std::vector<std::string> dispatched_kernel_names() { return split_lines(api().coverage()); }

MsimEncoder::MsimEncoder() : enc_(api().encoder_create()) {
  TORCH_CHECK(enc_ != nullptr, "msim: cannot create an encoder");
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  for (const auto& [key, value] : s.options) {
    check(api().set_option(enc_, key.c_str(), value.c_str()), "set_option");
  }
}

MsimEncoder::~MsimEncoder() { api().encoder_destroy(enc_); }

void MsimEncoder::set_pipeline(const std::string& host_name) {
  check(api().set_pipeline(enc_, host_name.c_str()), "set_pipeline");
  State& s = state();
  check_pipeline_limits(host_name, s.execution_width, s.max_threads);
}

uint32_t MsimEncoder::max_threads_per_threadgroup() { return state().max_threads; }

void MsimEncoder::set_buffer(unsigned index, const at::Tensor& t, size_t offset, size_t length) {
  TORCH_CHECK(t.device().is_cpu(), "msim: kernels run on CPU tensors, got ", t.device());
  check(api().set_buffer(enc_, index, t.storage().mutable_data(), offset, length), "set_buffer");
}

uint64_t MsimEncoder::storage_address(const at::Tensor& t, size_t offset) {
  TORCH_CHECK(t.device().is_cpu(), "msim: kernels run on CPU tensors, got ", t.device());
  return reinterpret_cast<uint64_t>(static_cast<char*>(t.storage().mutable_data()) + offset);
}

void MsimEncoder::set_bytes(unsigned index, const void* data, size_t length) {
  check(api().set_bytes(enc_, index, data, length), "set_bytes");
}

void MsimEncoder::dispatch_threadgroups(Dim3 groups, Dim3 threads) {
  const unsigned g[3] = {groups.x, groups.y, groups.z}, t[3] = {threads.x, threads.y, threads.z};
  check(api().dispatch_threadgroups(enc_, g, t), "dispatch");
}

void MsimEncoder::dispatch_threads(Dim3 grid, Dim3 threads) {
  const unsigned g[3] = {grid.x, grid.y, grid.z}, t[3] = {threads.x, threads.y, threads.z};
  check(api().dispatch_threads(enc_, g, t), "dispatch");
}

}  // namespace metalcore::msim
