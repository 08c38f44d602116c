"""metalcore: fused training and inference ops as first-class PyTorch dispatcher ops.

Every kernel is a ``torch.ops.metalcore.*`` operator with CPU, MPS (Metal) and CUDA kernels, a
fake implementation (FakeTensor, ``torch.compile``, ``torch.export``) and autograd whose backward
is itself a metalcore op. ``import metalcore`` registers them all; exported ``.pt2`` files that
use them load in any process that has imported metalcore.

Users' layer: ``metalcore.nn`` (drop-in modules), ``metalcore.optim.AdamW`` (fused drop-in for
``torch.optim.AdamW``), ``metalcore.patch(model)`` (reversible Hugging Face patch) and
``python -m metalcore`` (self-check, benchmark, training comparison, report).
"""

import torch  # noqa: F401  (libtorch must be loaded before the native library)

from . import _library

_library.load()

from . import (  # noqa: E402
    _fakes,  # noqa: F401  (registers the fake implementations)
    nn,  # drop-in modules over the ops
    optim,  # fused drop-in optimizer
)
from .functional import (  # noqa: E402
    adamw_step,
    fused_add_rmsnorm,
    gelu,
    rmsnorm,
    rope,
    silu,
    swiglu,
)
from .integrations.hf import PatchHandle, patch  # noqa: E402  (transformers imported lazily)

__version__ = "0.2.0.dev0"

__all__ = [
    "PatchHandle",
    "adamw_step",
    "fused_add_rmsnorm",
    "gelu",
    "nn",
    "optim",
    "patch",
    "rmsnorm",
    "rope",
    "silu",
    "swiglu",
]
