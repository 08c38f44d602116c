// Guarded shadow copies of bound buffers: each group of overlapping bindings is copied into a
// fresh mapping that ends at a PROT_NONE page, so the first byte past a binding faults.
#pragma once

#include <vector>

#include "internal.h"

namespace msim {

struct ShadowGroup {
  char* map = nullptr;
  size_t map_len = 0;
  char* host = nullptr;  // lowest host address of the group
  char* data = nullptr;  // its copy
  size_t len = 0;
  char* slack_lo = nullptr;  // canary bytes around the data (below guard-page resolution)
  char* slack_hi = nullptr;
  std::vector<int> indices;
  bool bytes = false;  // set_bytes data: never copied back
};

class Shadows {
 public:
  ~Shadows();
  // Builds shadows for the bindings the kernel uses; fills launch.buffers and zones.
  bool build(const Binding* bindings, const std::vector<int>& used, Dispatch& d);
  std::string check_canaries(const Dispatch& d) const;
  // Where this run's outputs first differ from `other` (same layout): "buffer(i) 'name' differs
  // at byte k", or "" if identical.
  std::string compare(const Shadows& other, const Dispatch& d) const;
  void copy_back() const;

 private:
  std::vector<ShadowGroup> groups_;
};

}  // namespace msim
