"""Drop-in modules backed by the metalcore ops.

``LayerNorm`` and ``FusedAddLayerNorm`` subclass ``torch.nn.LayerNorm`` the same way.
``RMSNorm`` and ``FusedAddRMSNorm`` subclass ``torch.nn.RMSNorm`` (same constructor,
parameters and ``state_dict``); ``SwiGLUMLP`` has ``LlamaMLP``'s parameter names;
``RotaryEmbedding`` produces Hugging Face's cos/sin tables. Each module runs torch's own math
on devices or dtypes that the ops do not cover, so swapping it in never changes what a model
can run on.
"""

from .layernorm import FusedAddLayerNorm, LayerNorm
from .llama import TinyLlama, TinyLlamaConfig
from .loss import LinearCrossEntropyLoss as LinearCrossEntropyLoss
from .mlp import SwiGLUMLP, swiglu
from .quant import GGUFLinear, Int4Linear, Int8Linear  # noqa: F401  (quantized layers)
from .rmsnorm import FusedAddRMSNorm, RMSNorm
from .rotary import RotaryEmbedding, apply_rotary, apply_rotary_torch, rope_inv_freq

__all__ = [
    "FusedAddLayerNorm",
    "FusedAddRMSNorm",
    "LayerNorm",
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

# --- LoRA linear
from .lora import LoRALinear  # noqa: E402

__all__ += ["LoRALinear"]

# --- embedding_bag
from .embedding import EmbeddingBag  # noqa: E402

__all__ += ["EmbeddingBag"]
