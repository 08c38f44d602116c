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
    attention,
    cross_entropy,
    fused_add_layer_norm,
    fused_add_rmsnorm,
    fused_linear_cross_entropy,
    gelu,
    layer_norm,
    log_softmax,
    rmsnorm,
    rope,
    scaled_dot_product_attention,
    silu,
    softmax,
    swiglu,
)
from .integrations.hf import PatchHandle, patch  # noqa: E402  (transformers imported lazily)

__version__ = "0.2.0.dev0"

__all__ = [
    "PatchHandle",
    "adamw_step",
    "attention",
    "fused_add_rmsnorm",
    "gelu",
    "nn",
    "optim",
    "patch",
    "rmsnorm",
    "rope",
    "scaled_dot_product_attention",
    "silu",
    "swiglu",
    # LayerNorm family
    "fused_add_layer_norm",
    "layer_norm",
    # Softmax and cross-entropy family
    "cross_entropy",
    "fused_linear_cross_entropy",
    "log_softmax",
    "softmax",
]

# --- Linear algebra: metalcore.linalg mirrors torch.linalg (and registers the ops' autograd).
from . import linalg  # noqa: E402

__all__ += ["linalg"]  # noqa: PLE0605

# --- Weight-only quantization (INT4/INT8 affine, GGUF blocks) and its quantizers.
from . import quant  # noqa: E402
from .quant import quantize_gguf, quantize_int4, quantize_int8  # noqa: E402, F401

# The quantizers stay out of __all__: it lists the op wrappers (swept by the adversarial
# tests); metalcore.quantize_int4 and friends are plain attributes, tested with metalcore.quant.
__all__ += ["quant"]

# --- embedding_bag and LoRA linear.
from .functional import embedding_bag, lora_linear  # noqa: E402

__all__ += ["embedding_bag", "lora_linear"]  # noqa: PLE0605
