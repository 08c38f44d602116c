"""Drop-in modules backed by the metalcore ops.

``RMSNorm`` and ``FusedAddRMSNorm`` subclass ``torch.nn.RMSNorm`` (same constructor,
parameters and ``state_dict``); ``SwiGLUMLP`` has ``LlamaMLP``'s parameter names;
``RotaryEmbedding`` produces Hugging Face's cos/sin tables. Each module runs torch's own math
on devices or dtypes that the ops do not cover, so swapping it in never changes what a model
can run on.
"""

from .llama import TinyLlama, TinyLlamaConfig
from .mlp import SwiGLUMLP, swiglu
from .rmsnorm import FusedAddRMSNorm, RMSNorm
from .rotary import RotaryEmbedding, apply_rotary, apply_rotary_torch, rope_inv_freq

__all__ = [
    "FusedAddRMSNorm",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLUMLP",
    "TinyLlama",
    "TinyLlamaConfig",
    "apply_rotary",
    "apply_rotary_torch",
    "rope_inv_freq",
    "swiglu",
]
