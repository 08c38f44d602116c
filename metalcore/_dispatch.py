"""Which devices have a metalcore kernel for an op.

The modules and the Hugging Face patch call a metalcore op only where the device has a kernel
for it (CPU always; MPS and CUDA where the library was built with them) and otherwise run
torch's own math, so a model never fails or silently changes results because it moved to a
device that metalcore does not cover.
"""

from __future__ import annotations

import torch

# Device type -> dispatch key under which a backend kernel is registered. "meta" has the fake
# implementations, so shape-only tracing of a model on the meta device takes the metalcore path.
_KEYS = {"cpu": "CPU", "cuda": "CUDA", "mps": "MPS", "meta": "Meta", "xpu": "XPU"}


# A constant for a given (op, device type) in one process: under torch.compile the answer is
# folded into the graph instead of being traced (the dispatcher query is not traceable).
@torch.compiler.assume_constant_result
def has_kernel(op: str, device_type: str) -> bool:
    """True when ``torch.ops.metalcore.<op>`` has a kernel for tensors on ``device_type``."""
    key = _KEYS.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"metalcore::{op}", key
    )


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
