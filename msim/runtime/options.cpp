// Dispatch options: defaults from MSIM_* environment variables, overridable per encoder.
#include <cstdlib>
#include <cstring>
#include <string>

#include "internal.h"

namespace msim {
namespace {

bool parse_order(const char* v, Order* out) {
  if (!strcmp(v, "forward"))
    *out = Order::kForward;
  else if (!strcmp(v, "reverse"))
    *out = Order::kReverse;
  else if (!strcmp(v, "random"))
    *out = Order::kRandom;
  else
    return false;
  return true;
}

bool parse_num(const char* v, double* out) {
  char* end = nullptr;
  *out = strtod(v, &end);
  return end && end != v && *end == 0 && *out >= 0;
}

}  // namespace

int set_option(Options& o, const char* key, const char* value) {
  if (!key || !value) return fail("msim: option key and value must not be null");
  std::string k = key;
  double num = 0;
  if (k == "lane_order" || k == "tg_order") {
    if (parse_order(value, k == "lane_order" ? &o.lane_order : &o.tg_order)) return 0;
    return fail(format("msim: %s must be forward, reverse or random, not '%s'", key, value));
  }
  if (k == "ulp") {
    static const char* const kNames[] = {"off", "random", "up", "down"};
    for (int i = 0; i < 4; ++i)
      if (!strcmp(value, kNames[i])) {
        o.ulp = (UlpMode)i;
        return 0;
      }
    if (!strcmp(value, "0") || !strcmp(value, "1")) {
      o.ulp = value[0] == '1' ? UlpMode::kRandom : UlpMode::kOff;
      return 0;
    }
    return fail(format("msim: ulp must be off, random, up or down (or 0/1), not '%s'", value));
  }
  if (!parse_num(value, &num))
    return fail(format("msim: option %s needs a non-negative number, not '%s'", key, value));
  if (k == "seed")
    o.seed = (uint64_t)num;
  else if (k == "workers")
    o.workers = (unsigned)num;
  else if (k == "guard")
    o.guard = num != 0;
  else if (k == "uninit_check")
    o.uninit_check = num != 0;
  else if (k == "order_check")
    o.order_check = num != 0;
  else if (k == "tg_mem_limit")
    o.tg_mem_limit = (size_t)num;
  else if (k == "max_threads")
    o.max_threads = (unsigned)num;
  else if (k == "stack_size")
    o.stack_size = num < 16384 ? 16384 : (size_t)num;
  else if (k == "timeout")
    o.timeout = num;
  else
    return fail(format("msim: unknown option '%s'", key));
  return 0;
}

Options options_from_env() {
  Options o;
  static const char* const kVars[][2] = {
      {"MSIM_LANE_ORDER", "lane_order"},
      {"MSIM_TG_ORDER", "tg_order"},
      {"MSIM_SEED", "seed"},
      {"MSIM_WORKERS", "workers"},
      {"MSIM_GUARD", "guard"},
      {"MSIM_UNINIT_CHECK", "uninit_check"},
      {"MSIM_ORDER_CHECK", "order_check"},
      {"MSIM_TG_MEM_LIMIT", "tg_mem_limit"},
      {"MSIM_STACK_SIZE", "stack_size"},
      {"MSIM_TIMEOUT", "timeout"},
      {"MSIM_ULP", "ulp"},
  };
  for (const auto& v : kVars) {
    const char* s = getenv(v[0]);
    if (s && *s) set_option(o, v[1], s);  // a bad value keeps the default
  }
  return o;
}

}  // namespace msim
