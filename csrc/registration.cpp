// The metalcore library: every op of the op table (ops.def) with its schema and the
// pt2_compliant tag. Backend kernels (CPU, MPS, CUDA) and autograd live next to their family in
// csrc/<family>/ and only register implementations.
#include <torch/library.h>

namespace {

// True when `schema` declares the op `name`, i.e. starts with "<name>(".
constexpr bool declares(const char* schema, const char* name) {
  while (*name != '\0') {
    if (*schema++ != *name++) return false;
  }
  return *schema == '(';
}

}  // namespace

// A table line whose name and schema disagree does not compile.
#define METALCORE_OP(name, schema) \
  static_assert(declares(schema, #name), "ops.def: the schema of " #name " names another op");
#include "ops.def"
#undef METALCORE_OP

TORCH_LIBRARY(metalcore, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
#define METALCORE_OP(name, schema) m.def(schema, tags);
#include "ops.def"
#undef METALCORE_OP

  // Where Dynamo should look for the Python fake implementations.
  m.set_python_module("metalcore._fakes");
}
