"""Input checks on the Python side, mirroring ``csrc/common/checks.h`` one function for one.

The fakes (:mod:`metalcore._fakes`) run instead of a kernel whenever a call reaches the ``Meta``
key: under ``torch.compile``/``torch.export`` tracing, and in eager mode whenever any argument is a
meta tensor (``Meta`` outranks every backend in the dispatcher, so a meta tensor mixed with CPU
tensors lands here too). They must therefore reject exactly what the kernels reject, with the same
exception type and the same message text, or a traced program and an eager call would disagree
about what is valid, and a mixed-device call would return uninitialized memory.

Checks on sizes go through ``torch._check_value``: under symbolic shapes it turns the condition
into a guard (or a runtime assert for unbacked sizes) instead of failing on an undecidable
``bool()``, and it raises ``ValueError`` like the C++ ``TORCH_CHECK_VALUE`` (``torch._check``
would raise ``RuntimeError``). dtype, device, layout and rank are never symbolic: plain ``if``.
Messages are built only on failure.
"""

from __future__ import annotations

import warnings

import torch
from torch.fx.experimental.symbolic_shapes import sym_eq

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# What the Metal kernels support (csrc/common/kernel_name.h): no float64 on Apple GPUs.
METAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _cpp_dtype_names() -> dict[torch.dtype, str]:
    # c10's ScalarType names ("Float", "Int", "ComplexFloat", "QUInt8") are what the C++ messages
    # print. torch exposes them only through the legacy type strings ("torch.FloatTensor",
    # "torch.quantized.QUInt8Tensor"), so the table is read from those once, at import, for every
    # dtype this torch has: no hand-kept copy to drift.
    names = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized and complex32 creation warn
        for dtype in {v for v in vars(torch).values() if isinstance(v, torch.dtype)}:
            try:
                legacy = torch.empty(0, dtype=dtype).type()
            except (RuntimeError, TypeError):
                continue
            names[dtype] = legacy.rsplit(".", 1)[-1].removesuffix("Tensor")
    return names


_DTYPE_NAMES = _cpp_dtype_names()

# c10's Layout names, as printed by the C++ checks (csrc/adamw/adamw.h).
_LAYOUT_NAMES = {
    torch.strided: "Strided",
    torch.sparse_coo: "Sparse",
    torch.sparse_csr: "SparseCsr",
    torch.sparse_csc: "SparseCsc",
    torch.sparse_bsr: "SparseBsr",
    torch.sparse_bsc: "SparseBsc",
    torch._mkldnn: "Mkldnn",
    torch.jagged: "Jagged",
}


def dtype_name(dtype: torch.dtype) -> str:
    """The name C++ prints for ``dtype`` (``torch.int32`` -> ``Int``)."""
    return _DTYPE_NAMES.get(dtype, str(dtype))


def layout_name(layout: torch.layout) -> str:
    return _LAYOUT_NAMES.get(layout, str(layout))


def sizes(t: torch.Tensor) -> str:
    """A shape as C++ prints ``t.sizes()``: ``[4, 8]`` (symbolic sizes by their symbol)."""
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def fmt_float(v) -> str:
    """A double as C++ streams print it (six significant digits: ``1e-06``, ``-1``, ``nan``)."""
    try:
        return format(float(v), "g")
    except (TypeError, ValueError):  # a symbolic float: print its expression
        return str(v)


def check_defined(op: str, arg: str, t) -> None:
    if t is None:
        raise ValueError(f"metalcore.{op}: '{arg}' must be a tensor, got None")


def check_float(op: str, arg: str, t: torch.Tensor) -> None:
    """float16, bfloat16, float32 (and float64, used by gradcheck references)."""
    check_defined(op, arg, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"metalcore.{op}: '{arg}' must be float16, bfloat16, float32 or float64, "
            f"got {dtype_name(t.dtype)}"
        )


def check_same_dtype(op: str, arg: str, t: torch.Tensor, ref_arg: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(
            f"metalcore.{op}: '{arg}' must have the same dtype as '{ref_arg}' "
            f"({dtype_name(ref.dtype)}), got {dtype_name(t.dtype)}"
        )


def check_same_device(op: str, arg: str, t: torch.Tensor, ref_arg: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise RuntimeError(
            f"metalcore.{op}: '{arg}' must be on the same device as '{ref_arg}' "
            f"({ref.device}), got {t.device}"
        )


def check_same_shape(op: str, arg: str, t: torch.Tensor, ref_arg: str, ref: torch.Tensor) -> None:
    torch._check_value(
        t.dim() == ref.dim() and sym_eq(t.shape, ref.shape),
        lambda: (
            f"metalcore.{op}: '{arg}' must have the same shape as '{ref_arg}' {sizes(ref)}, "
            f"got {sizes(t)}"
        ),
    )


def check_dim_at_least(op: str, arg: str, t: torch.Tensor, min_dim: int) -> None:
    if t.dim() < min_dim:
        raise ValueError(
            f"metalcore.{op}: '{arg}' must have at least {min_dim} dimension(s), "
            f"got shape {sizes(t)}"
        )


def check_eps(op: str, eps) -> None:
    # `not (eps >= 0)` rejects NaN too, as the C++ check does.
    torch._check_value(
        eps >= 0.0, lambda: f"metalcore.{op}: 'eps' must be >= 0, got {fmt_float(eps)}"
    )


def check_metal_dtype(op: str, arg: str, t: torch.Tensor) -> None:
    """The Metal backend's own dtype limit (csrc/common/kernel_name.h), for MPS tensors."""
    if t.device.type == "mps" and t.dtype not in METAL_DTYPES:
        raise TypeError(
            f"metalcore.{op}: '{arg}' must be float16, bfloat16 or float32 on the Metal backend, "
            f"got {dtype_name(t.dtype)}"
        )


def check_dense(op: str, arg: str, t: torch.Tensor) -> None:
    """A plain strided tensor: sparse, mkldnn and nested tensors have no kernel here.

    (Quantized tensors are strided; their dtype is what check_float rejects.)"""
    if t.layout != torch.strided:
        raise ValueError(
            f"metalcore.{op}: '{arg}' must be a dense (strided) tensor, got layout "
            f"{layout_name(t.layout)}"
        )
    if t.is_nested:
        raise ValueError(
            f"metalcore.{op}: '{arg}' must be a dense (strided) tensor, got a nested tensor"
        )
