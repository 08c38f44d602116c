// Test-only library (never shipped): the `metalcore_msim` namespace has the schemas of the
// `metalcore` ops (the op table, ops.def), with CPU kernels that run the Metal launch layer
// through msim on CPU tensors (each family's launch file registers them, see
// common/metal_registration.h). Tests load it next to metalcore and compare both against float64
// references; the user-facing `metalcore` ops and their CPU kernels are untouched
// (csrc/mps/README.md explains the choice).
#include <torch/library.h>

#include "common/metal_registration.h"
#include "msim/msim_encoder.h"

namespace metalcore::msim {

TORCH_LIBRARY(metalcore_msim, m) {
  // Control ops: no tensors, so they run as catch-all kernels.
  m.def("load_kernels(str path) -> ()", [](const std::string& path) { load_library(path); });
  m.def("set_option(str key, str value) -> ()",
        [](const std::string& k, const std::string& v) { set_option(k, v); });
  m.def("library_kernel_names() -> str[]", [] { return library_kernel_names(); });
  m.def("dispatched_kernel_names() -> str[]", [] { return dispatched_kernel_names(); });
  m.def("launch_kernel_names() -> str[]", [] { return metalcore::launch_kernel_names(); });

  // The schemas of the metalcore ops, from the one op table.
#define METALCORE_OP(name, schema) m.def(schema);
#include "ops.def"
#undef METALCORE_OP
}

}  // namespace metalcore::msim
