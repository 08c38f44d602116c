"""Whether a metalcore op has a kernel for given tensors: the one predicate of the package.

The modules (``metalcore.nn``), the optimizer, the Hugging Face patch, the main command and the
benchmarks call a metalcore op only where :func:`kernel_applies` says the op covers the tensors
(a device whose backend the library was built with, a kernel dtype, one device, plain strided
tensors) and otherwise run torch's own math, so a model never fails or silently changes results
because it moved to a device or dtype that metalcore does not cover. What is specific to one op
(shapes, a dtype mix such as rope's float32 tables with bfloat16 q/k) stays with its caller.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Device type -> dispatch key under which a backend kernel is registered. "meta" has the fake
# implementations, so shape-only tracing of a model on the meta device takes the metalcore path.
_KEYS = {"cpu": "CPU", "cuda": "CUDA", "mps": "MPS", "meta": "Meta"}

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The dtypes every metalcore kernel takes."""


# A constant for a given (op, device type) in one process: under torch.compile the answer is
# folded into the graph instead of being traced (the dispatcher query is not traceable).
@torch.compiler.assume_constant_result
def has_kernel(op: str, device_type: str) -> bool:
    """True when ``torch.ops.metalcore.<op>`` has a kernel for tensors on ``device_type``
    (``"cpu"``, ``"cuda"``, ``"mps"``, ``"meta"``) in this build."""
    key = _KEYS.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"metalcore::{op}", key
    )


def kernel_applies(op: str, *tensors: Tensor | None, same_dtype: bool = True) -> bool:
    """True when ``torch.ops.metalcore.<op>`` has a kernel for ``tensors`` (``None`` entries,
    absent optional arguments, are skipped):

    * every tensor is a plain strided tensor (not sparse, mkldnn or nested) of a dtype in
      :data:`KERNEL_DTYPES`, and with ``same_dtype`` all of one dtype;
    * all are on one device, and this build has a kernel of ``op`` for its type.

    Callers add what is specific to their op (shapes, ranks, an allowed dtype mix with
    ``same_dtype=False``). Under ``torch.compile`` every term is a guard on tensor metadata
    or a folded constant, so the check adds nothing to the graph.
    """
    present = [t for t in tensors if t is not None]
    if not present:
        return False
    device, dtype = present[0].device, present[0].dtype
    for t in present:
        if t.layout != torch.strided or t.is_nested or t.dtype not in KERNEL_DTYPES:
            return False
        if t.device != device or (same_dtype and t.dtype != dtype):
            return False
    return has_kernel(op, device.type)
