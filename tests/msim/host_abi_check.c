/* Exercises the plain C host ABI (msim_host.h) from a gcc-compiled program, as the op layer's
 * msim encoder will: dlopen, look up kernels, bind with offsets, dispatch, read errors. */
#define MSIM_HOST_LOADER
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "msim_host.h"

#define CHECK(cond, ...)            \
  do {                              \
    if (!(cond)) {                  \
      fprintf(stderr, __VA_ARGS__); \
      fprintf(stderr, "\n");        \
      return 1;                     \
    }                               \
  } while (0)

int main(int argc, char** argv) {
  msim_api api;
  char err[512];
  CHECK(argc == 3, "usage: host_abi_check KERNEL_LIB BUGS_LIB");
  CHECK(msim_api_open(argv[1], &api, err, sizeof err) == 0, "%s", err);
  CHECK(api.kernel_find("silu_float") >= 0, "silu_float missing");
  CHECK(api.kernel_find("no_such_kernel") == -1, "lookup of an absent kernel must fail");
  CHECK(strstr(api.last_error(), "no_such_kernel"), "error names the kernel: %s", api.last_error());
  int i = api.kernel_find("silu_float");
  CHECK(strstr(api.kernel_signature(i), "buffer|0|device|device const float *|x"), "signature");

  float x[64], y[64];
  for (int k = 0; k < 64; ++k) x[k] = (float)k / 8.0f - 4.0f, y[k] = 0.0f;
  unsigned n = 20;
  msim_encoder* enc = api.encoder_create();
  CHECK(api.set_pipeline(enc, "silu_float") == 0, "%s", api.last_error());
  CHECK(api.set_buffer(enc, 0, x, 8 * sizeof(float), 20 * sizeof(float)) == 0, "bind x");
  CHECK(api.set_buffer(enc, 1, y, 4 * sizeof(float), 20 * sizeof(float)) == 0, "bind y");
  CHECK(api.set_bytes(enc, 2, &n, sizeof n) == 0, "bytes");
  unsigned grid[3] = {20, 1, 1}, tg[3] = {8, 1, 1};
  CHECK(api.dispatch_threads(enc, grid, tg) == 0, "%s", api.last_error());
  for (int k = 0; k < 20; ++k) {
    float v = x[8 + k], want = v / (1.0f + expf(-v));
    CHECK(fabsf(y[4 + k] - want) < 1e-5f, "y[%d] = %f, want %f", 4 + k, y[4 + k], want);
  }
  CHECK(y[3] == 0.0f && y[24] == 0.0f, "writes outside the bound range");
  unsigned big[3] = {2048, 1, 1};
  CHECK(api.dispatch_threadgroups(enc, grid, big) == -1, "2048 threads must be rejected");
  CHECK(strstr(api.last_error(), "exceeds the limit of 1024"), "%s", api.last_error());
  api.encoder_destroy(enc);

  /* A detector report comes back as an error string, and the process keeps going. */
  msim_api bugs;
  CHECK(msim_api_open(argv[2], &bugs, err, sizeof err) == 0, "%s", err);
  float p[40], g[40];
  for (int k = 0; k < 40; ++k) p[k] = g[k] = 1.0f;
  enc = bugs.encoder_create();
  CHECK(bugs.set_pipeline(enc, "oob_bug") == 0, "%s", bugs.last_error());
  bugs.set_buffer(enc, 0, p, 0, sizeof p);
  bugs.set_buffer(enc, 1, g, 0, sizeof g);
  unsigned groups[3] = {1, 1, 1}, tpg[3] = {16, 1, 1};
  CHECK(bugs.dispatch_threadgroups(enc, groups, tpg) == -1, "out-of-bounds must be reported");
  CHECK(strstr(bugs.last_error(), "out-of-bounds access to buffer("), "%s", bugs.last_error());
  bugs.encoder_destroy(enc);
  CHECK(strstr(api.coverage(), "silu_float\n"), "coverage lists silu_float");
  printf("host ABI ok\n");
  return 0;
}
