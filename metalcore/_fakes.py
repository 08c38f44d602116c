"""Fake (meta) implementations of every metalcore op, and the errors of unsupported layouts.

FakeTensor tracing (``torch.compile``, ``torch.export``, ``opcheck``) runs these instead of a
kernel, and so does every eager call with a meta tensor among its arguments (the dispatcher's
``Meta`` key outranks every backend). They read only shapes, dtypes and devices, use symbolic
sizes as given (so a new batch size does not recompile), and return tensors with exactly the
strides the real kernels produce (contiguous).

Each fake first runs the same checks as the kernels, in the same order, with the same exception
types and messages (``metalcore._checks`` mirrors ``csrc/common/checks.h``; the per-family
validators below mirror ``csrc/<family>/<family>.h``), so a traced program and an eager call agree
on what is valid, and a meta tensor mixed with CPU tensors is an error instead of uninitialized
memory. tests/reliability/test_adversarial.py runs every bad-input case of the op specs on meta
and compares with the CPU kernels.
"""

from __future__ import annotations

import torch
from torch.library import register_fake

from ._checks import (
    check_dense,
    check_dim_at_least,
    check_eps,
    check_float,
    check_metal_dtype,
    check_same_device,
    check_same_dtype,
    check_same_shape,
    dtype_name,
    fmt_float,
    layout_name,
    sizes,
)


def _check_like(op: str, arg: str, t, ref_arg: str, ref) -> None:
    """``t`` matches ``ref`` in device, dtype and shape (csrc/activation/activation.h)."""
    check_same_device(op, arg, t, ref_arg, ref)
    check_same_dtype(op, arg, t, ref_arg, ref)
    check_same_shape(op, arg, t, ref_arg, ref)


def _new_like(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(t.shape)


# --- RMSNorm (csrc/rmsnorm/rmsnorm.h) ----------------------------------------------------------


def _rms_check_inputs(op: str, input, weight, eps, input_name: str = "input") -> None:
    check_float(op, input_name, input)
    check_dim_at_least(op, input_name, input, 1)
    check_eps(op, eps)
    if weight is not None:
        n = input.shape[-1]
        check_same_device(op, "weight", weight, input_name, input)
        check_same_dtype(op, "weight", weight, input_name, input)
        torch._check_value(
            weight.dim() == 1 and weight.shape[0] == n,
            lambda: (
                f"metalcore.{op}: 'weight' must have shape [{n}] (the last dim of "
                f"'{input_name}'), got {sizes(weight)}"
            ),
        )


def _rms_backward(op: str, x_arg: str, grad_out, grad_res, x, weight, eps):
    _rms_check_inputs(op, x, weight, eps, x_arg)
    _check_like(op, "grad_out", grad_out, x_arg, x)
    if grad_res is not None:
        _check_like(op, "grad_residual_out", grad_res, x_arg, x)
    check_metal_dtype(op, x_arg, x)
    n = x.shape[-1] if weight is not None else 0
    return _new_like(x), x.new_empty((n,))


@register_fake("metalcore::rmsnorm")
def _rmsnorm(input, weight, eps):
    _rms_check_inputs("rmsnorm", input, weight, eps)
    check_metal_dtype("rmsnorm", "input", input)
    return _new_like(input)


@register_fake("metalcore::rmsnorm_backward")
def _rmsnorm_backward(grad_out, input, weight, eps):
    return _rms_backward("rmsnorm_backward", "input", grad_out, None, input, weight, eps)


@register_fake("metalcore::fused_add_rmsnorm")
def _fused_add_rmsnorm(input, residual, weight, eps):
    op = "fused_add_rmsnorm"
    _rms_check_inputs(op, input, weight, eps)
    check_float(op, "residual", residual)
    _check_like(op, "residual", residual, "input", input)
    check_metal_dtype(op, "input", input)
    return _new_like(input), _new_like(input)


@register_fake("metalcore::fused_add_rmsnorm_backward")
def _fused_add_rmsnorm_backward(grad_out, grad_residual_out, residual_out, weight, eps):
    return _rms_backward(
        "fused_add_rmsnorm_backward",
        "residual_out",
        grad_out,
        grad_residual_out,
        residual_out,
        weight,
        eps,
    )


# --- Activations (csrc/activation/activation.h) ------------------------------------------------


def _check_approximate(op: str, approximate: str) -> None:
    if approximate not in ("none", "tanh"):
        raise ValueError(
            f"metalcore.{op}: 'approximate' must be 'none' or 'tanh', got '{approximate}'"
        )


def _act(op: str, ref_arg: str, ref, others=(), approximate: str | None = None):
    """The activation ops' checks: ``ref`` is float; every other operand is float and matches it
    in device, dtype and shape; then the mode, then the backend's own limits."""
    check_float(op, ref_arg, ref)
    for arg, t in others:
        check_float(op, arg, t)
        _check_like(op, arg, t, ref_arg, ref)
    if approximate is not None:
        _check_approximate(op, approximate)
    check_metal_dtype(op, ref_arg, ref)
    return _new_like(ref)


@register_fake("metalcore::silu")
def _silu(input):
    return _act("silu", "input", input)


@register_fake("metalcore::silu_backward")
def _silu_backward(grad_out, input):
    return _act("silu_backward", "input", input, [("grad_out", grad_out)])


@register_fake("metalcore::gelu")
def _gelu(input, approximate="none"):
    return _act("gelu", "input", input, approximate=approximate)


@register_fake("metalcore::gelu_backward")
def _gelu_backward(grad_out, input, approximate="none"):
    return _act("gelu_backward", "input", input, [("grad_out", grad_out)], approximate)


@register_fake("metalcore::swiglu")
def _swiglu(gate, up):
    return _act("swiglu", "gate", gate, [("up", up)])


@register_fake("metalcore::swiglu_backward")
def _swiglu_backward(grad_out, gate, up):
    out = _act("swiglu_backward", "gate", gate, [("up", up), ("grad_out", grad_out)])
    return out, _new_like(up)


# --- RoPE (csrc/rope/rope.h) -------------------------------------------------------------------


def _check_rope(op: str, q_name: str, q, k_name: str, k, cos, sin) -> None:
    for name, t in ((q_name, q), (k_name, k), ("cos", cos), ("sin", sin)):
        check_float(op, name, t)
    check_same_device(op, k_name, k, q_name, q)
    check_same_device(op, "cos", cos, q_name, q)
    check_same_device(op, "sin", sin, q_name, q)
    check_same_dtype(op, k_name, k, q_name, q)
    reduced = q.dtype in (torch.float16, torch.bfloat16)
    if not (cos.dtype == q.dtype or (reduced and cos.dtype == torch.float32)):
        raise TypeError(
            f"metalcore.{op}: 'cos' must have the same dtype as '{q_name}' "
            f"({dtype_name(q.dtype)}){' or float32' if reduced else ''}, "
            f"got {dtype_name(cos.dtype)}"
        )
    check_same_dtype(op, "sin", sin, "cos", cos)
    for name, t in ((q_name, q), (k_name, k)):
        if t.dim() != 4:
            raise ValueError(
                f"metalcore.{op}: '{name}' must be 4-D [batch, heads, seq, head_dim], "
                f"got shape {sizes(t)}"
            )
    b, s, d = q.shape[0], q.shape[2], q.shape[3]
    torch._check_value(
        k.shape[0] == b and k.shape[2] == s and k.shape[3] == d,
        lambda: (
            f"metalcore.{op}: '{k_name}' must have the batch, seq and head_dim of "
            f"'{q_name}' {sizes(q)}, got shape {sizes(k)}"
        ),
    )
    if cos.dim() not in (2, 3):
        raise ValueError(
            f"metalcore.{op}: 'cos' must be 2-D [seq, rot] or 3-D [batch or 1, seq, rot], "
            f"got shape {sizes(cos)}"
        )
    check_same_shape(op, "sin", sin, "cos", cos)
    torch._check_value(
        cos.shape[-2] == s,
        lambda: (
            f"metalcore.{op}: 'cos' must have seq = {s} (dim 2 of '{q_name}') in dim -2, "
            f"got shape {sizes(cos)}"
        ),
    )
    if cos.dim() == 3:
        torch._check_value(
            cos.shape[0] == 1 or cos.shape[0] == b,
            lambda: (
                f"metalcore.{op}: 'cos' must have batch 1 or {b} in dim 0, got shape {sizes(cos)}"
            ),
        )
    rot = cos.shape[-1]
    torch._check_value(
        rot % 2 == 0 and rot <= d,
        lambda: (
            f"metalcore.{op}: 'cos' last dim (rot) must be even and <= head_dim = {d}, got {rot}"
        ),
    )
    check_metal_dtype(op, q_name, q)
    check_metal_dtype(op, "cos", cos)


@register_fake("metalcore::rope")
def _rope(q, k, cos, sin, interleaved=False):
    _check_rope("rope", "q", q, "k", k, cos, sin)
    return _new_like(q), _new_like(k)


@register_fake("metalcore::rope_backward")
def _rope_backward(grad_q_out, grad_k_out, cos, sin, interleaved=False):
    _check_rope("rope_backward", "grad_q_out", grad_q_out, "grad_k_out", grad_k_out, cos, sin)
    return _new_like(grad_q_out), _new_like(grad_k_out)


# --- AdamW (csrc/adamw/adamw.h and the backends' device rules) ----------------------------------


def _dense_no_gaps(t: torch.Tensor) -> bool:
    import torch._prims_common as pc

    f = getattr(pc, "is_non_overlapping_and_dense_or_false", None)
    f = f or pc.is_non_overlapping_and_dense
    return f(t)


def _adamw_check_dense(op: str, arg: str, t) -> None:
    if t.layout != torch.strided:
        raise ValueError(
            f"metalcore.{op}: '{arg}' must be a dense (strided) tensor, got layout "
            f"{layout_name(t.layout)} (sparse gradients are not supported)"
        )
    if not (t.numel() == 0 or _dense_no_gaps(t)):
        raise ValueError(
            f"metalcore.{op}: '{arg}' must be contiguous (or dense without gaps or overlap), "
            f"got sizes {sizes(t)} and strides {list(t.stride())}"
        )


def _adamw_check_like_param(op: str, arg: str, t, param_arg: str, p) -> None:
    check_same_device(op, arg, t, param_arg, p)
    check_same_shape(op, arg, t, param_arg, p)
    _adamw_check_dense(op, arg, t)
    same_order = (t.is_contiguous() and p.is_contiguous()) or t.stride() == p.stride()
    if not (p.numel() == 0 or same_order):
        raise ValueError(
            f"metalcore.{op}: '{arg}' must have the same memory layout as '{param_arg}' "
            f"(strides {list(p.stride())}), got strides {list(t.stride())}"
        )


def _adamw_state_dtype_ok(param: torch.dtype, state: torch.dtype) -> bool:
    return state == param or (state == torch.float32 and param in (torch.bfloat16, torch.float16))


def _adamw_check_state(op: str, arg: str, t, param_arg: str, p, first_state) -> None:
    if not _adamw_state_dtype_ok(p.dtype, t.dtype):
        raise TypeError(
            f"metalcore.{op}: '{arg}' must be float32 or the dtype of '{param_arg}' "
            f"({dtype_name(p.dtype)}), got {dtype_name(t.dtype)}"
        )
    if first_state is not None and t.dtype != first_state.dtype:
        raise TypeError(
            f"metalcore.{op}: '{arg}' must have the same dtype as the other optimizer states of "
            f"'{param_arg}' ({dtype_name(first_state.dtype)}), got {dtype_name(t.dtype)}"
        )
    _adamw_check_like_param(op, arg, t, param_arg, p)


def _adamw_check_hyper(op: str, beta1, beta2, weight_decay, eps) -> None:
    for name, v in (("beta1", beta1), ("beta2", beta2)):
        if not (0.0 <= v < 1.0):
            raise ValueError(f"metalcore.{op}: '{name}' must be in [0, 1), got {fmt_float(v)}")
    for name, v in (("weight_decay", weight_decay), ("eps", eps)):
        if not v >= 0.0:
            raise ValueError(f"metalcore.{op}: '{name}' must be >= 0, got {fmt_float(v)}")


def _adamw_check_lr(op: str, lr) -> None:
    if lr.dim() != 0:
        raise ValueError(f"metalcore.{op}: 'lr' must be a 0-dim tensor, got shape {sizes(lr)}")
    if lr.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"metalcore.{op}: 'lr' must be float32 or float64, got {dtype_name(lr.dtype)}"
        )


def _adamw_check_lists(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad):
    n = len(params)
    lists = dict(grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, state_steps=steps)
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(
                f"metalcore.{op}: '{name}' must have one tensor per param ({n}), got {len(lst)}"
            )
    if amsgrad and len(max_exp_avg_sqs) != n:
        raise ValueError(
            f"metalcore.{op}: 'max_exp_avg_sqs' must have one tensor per param ({n}) when "
            f"amsgrad=True, got {len(max_exp_avg_sqs)}"
        )
    if not amsgrad and len(max_exp_avg_sqs) != 0:
        raise ValueError(
            f"metalcore.{op}: 'max_exp_avg_sqs' must be empty when amsgrad=False, got "
            f"{len(max_exp_avg_sqs)} tensor(s)"
        )
    for i, p in enumerate(params):
        pa = f"params[{i}]"
        check_float(op, pa, p)
        _adamw_check_dense(op, pa, p)
        ga, g = f"grads[{i}]", grads[i]
        if g.layout != torch.strided:
            _adamw_check_dense(op, ga, g)
        check_same_dtype(op, ga, g, pa, p)
        _adamw_check_like_param(op, ga, g, pa, p)
        _adamw_check_state(op, f"exp_avgs[{i}]", exp_avgs[i], pa, p, None)
        _adamw_check_state(op, f"exp_avg_sqs[{i}]", exp_avg_sqs[i], pa, p, exp_avgs[i])
        if amsgrad:
            _adamw_check_state(op, f"max_exp_avg_sqs[{i}]", max_exp_avg_sqs[i], pa, p, exp_avgs[i])
        s = steps[i]
        # A wrong dtype is a TypeError, like every dtype error; a wrong shape a ValueError.
        for error, ok in (
            (TypeError, s.dtype in (torch.float32, torch.float64)),
            (ValueError, s.dim() == 0),
        ):
            if not ok:
                raise error(
                    f"metalcore.{op}: 'state_steps[{i}]' must be a 0-dim float32 or float64 "
                    f"tensor, got {dtype_name(s.dtype)} of shape {sizes(s)}"
                )


def _adamw_check_devices(op: str, params, steps, lr) -> None:
    """Where lr and the steps may live: on the CPU (read on the host) or on the params' device;
    the Metal backend keeps every step on the device, in float32 (csrc/adamw/adamw_launch.cpp)."""
    dev = params[0].device
    for i, p in enumerate(params):
        if p.device != dev:
            raise RuntimeError(
                f"metalcore.{op}: 'params[{i}]' must be on the device of 'params[0]' ({dev}), "
                f"got {p.device}"
            )
        check_metal_dtype(op, f"params[{i}]", p)
    if not (lr.device.type == "cpu" or lr.device == dev):
        raise RuntimeError(
            f"metalcore.{op}: 'lr' must be on the CPU or on the params' device ({dev}), "
            f"got {lr.device}"
        )
    for i, s in enumerate(steps):
        on_host_ok = s.device.type == "cpu" and dev.type != "mps"
        if not (on_host_ok or s.device == dev):
            where = (
                "on the device of the params"
                if dev.type == "mps"
                else "on the CPU or on the params' device"
            )
            raise RuntimeError(
                f"metalcore.{op}: 'state_steps[{i}]' must be {where} ({dev}), got {s.device}"
            )
        if dev.type == "mps" and s.dtype != torch.float32:
            raise TypeError(
                f"metalcore.{op}: 'state_steps[{i}]' must be float32 on the Metal backend, "
                f"got {dtype_name(s.dtype)}"
            )
    # A real (not traced) CPU lr has a value to check, as the device backends check it.
    if type(lr) is torch.Tensor and lr.device.type == "cpu" and not lr.item() >= 0.0:
        raise ValueError(f"metalcore.{op}: 'lr' must be >= 0, got {fmt_float(lr.item())}")


@register_fake("metalcore::adamw")
def _adamw(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    state_steps,
    lr,
    beta1,
    beta2,
    weight_decay,
    eps,
    amsgrad=False,
    maximize=False,
):
    op = "adamw"
    _adamw_check_hyper(op, beta1, beta2, weight_decay, eps)
    _adamw_check_lr(op, lr)
    _adamw_check_lists(
        op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad
    )
    if params:
        _adamw_check_devices(op, params, state_steps, lr)
    return None


# --- Tensors of other layouts ------------------------------------------------------------------
# A sparse, quantized, mkldnn or nested argument sends a call to its own dispatch key, where no
# metalcore kernel exists, and the dispatcher's NotImplementedError names neither the op's
# argument nor the reason. These kernels name both. They run only on such inputs, so being Python
# costs the supported path nothing.

_LAYOUT_KEYS = (
    "SparseCPU",
    "SparseCUDA",
    "SparseMPS",
    "SparseMeta",
    "SparseCsrCPU",
    "SparseCsrCUDA",
    "SparseCsrMPS",
    "SparseCsrMeta",
    "QuantizedCPU",
    "QuantizedCUDA",
    "MkldnnCPU",
    "NestedTensorCPU",
    "NestedTensorCUDA",
    "NestedTensorMeta",
    # Nested tensors reach autograd through a key of their own: where an op has no autograd
    # kernel (adamw, which is not differentiable) nothing would answer there either.
    "AutogradNestedTensor",
)


def _tensor_args(schema, args, kwargs):
    """(name, tensor) for every tensor argument in schema order; list elements as ``name[i]``."""
    for i, a in enumerate(schema.arguments):
        v = args[i] if i < len(args) else kwargs.get(a.name)
        if isinstance(v, torch.Tensor):
            yield a.name, v
        elif isinstance(v, (list, tuple)):
            for j, t in enumerate(v):
                if isinstance(t, torch.Tensor):
                    yield f"{a.name}[{j}]", t


def _reject_other_layouts(name: str, schema):
    def kernel(*args, **kwargs):
        for arg, t in _tensor_args(schema, args, kwargs):
            if name == "adamw" and t.layout != torch.strided:
                # adamw's kernel words its error for sparse layouts (its checks serve SparseCPU).
                _adamw_check_dense(name, arg, t)
            check_dense(name, arg, t)
            if t.is_quantized:
                check_float(name, arg, t)
        raise NotImplementedError(f"metalcore.{name}: no kernel for these tensors' layout")

    return kernel


def _register_layout_errors() -> None:
    lib = torch.library.Library("metalcore", "IMPL")  # noqa: TOR901 (kept alive below)
    _register_layout_errors.lib = lib
    names = sorted(
        n.split("::", 1)[1]
        for n in torch._C._dispatch_get_all_op_names()
        if n.startswith("metalcore::")
    )
    for name in names:
        op = getattr(torch.ops.metalcore, name).default
        kernel = _reject_other_layouts(name, op._schema)
        for key in _LAYOUT_KEYS:
            # adamw sends sparse grads to its own checks already (csrc/adamw/adamw_cpu.cpp).
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"metalcore::{name}", key):
                lib.impl(name, kernel, key)
        # Jagged nested tensors are a Python subclass: their __torch_dispatch__ decides.
        if _Jagged is not None:
            torch.library.register_torch_dispatch(
                op, _Jagged, lambda cls, func, types, args, kwargs, k=kernel: k(*args, **kwargs)
            )


try:  # the jagged NestedTensor class has no public import path
    from torch.nested._internal.nested_tensor import NestedTensor as _Jagged
except ImportError:  # pragma: no cover - a torch that moved it: its own error then applies
    _Jagged = None

_register_layout_errors()


# --- Linear algebra (csrc/linalg/linalg.h) -----------------------------------------------------


def _la_dtype(t) -> torch.dtype:
    # float16/bfloat16 are computed and returned in float32.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _la_check_matrix(op: str, arg: str, t) -> None:
    check_float(op, arg, t)
    if t.dim() < 2:
        raise ValueError(
            f"metalcore.{op}: '{arg}' must have at least 2 dimensions (a batch of matrices), "
            f"got shape {sizes(t)}"
        )


def _la_check_square(op: str, arg: str, t) -> None:
    _la_check_matrix(op, arg, t)
    torch._check_value(
        t.shape[-1] == t.shape[-2],
        lambda: f"metalcore.{op}: '{arg}' must be a batch of square matrices, got shape {sizes(t)}",
    )


@register_fake("metalcore::cholesky_ex")
def _cholesky_ex(A, upper=False):
    _la_check_square("cholesky_ex", "A", A)
    return A.new_empty(A.shape, dtype=_la_dtype(A)), A.new_empty(A.shape[:-2], dtype=torch.int32)


@register_fake("metalcore::solve_triangular")
def _solve_triangular(A, B, upper, left=True, unitriangular=False):
    op = "solve_triangular"
    _la_check_square(op, "A", A)
    _la_check_matrix(op, "B", B)
    check_same_device(op, "B", B, "A", A)
    check_same_dtype(op, "B", B, "A", A)
    n = A.shape[-1]
    shared = B.shape[-2] if left else B.shape[-1]
    side = "rows (A X = B" if left else "columns (X A = B"
    torch._check_value(
        shared == n,
        lambda: (
            f"metalcore.{op}: 'B' must have {n} {side} with A of size {n}), got shape {sizes(B)}"
        ),
    )
    a_batch, b_batch = list(A.shape[:-2]), list(B.shape[:-2])
    nd = max(len(a_batch), len(b_batch))
    a_batch = [1] * (nd - len(a_batch)) + a_batch
    b_batch = [1] * (nd - len(b_batch)) + b_batch
    out = []
    for sa, sb in zip(a_batch, b_batch):
        torch._check_value(
            sa == sb or sa == 1 or sb == 1,
            lambda: (
                f"metalcore.{op}: the batch dims of 'A' {sizes(A)} and 'B' {sizes(B)} must "
                "broadcast"
            ),
        )
        out.append(sb if sa == 1 else sa)
    return A.new_empty((*out, B.shape[-2], B.shape[-1]), dtype=_la_dtype(A))


@register_fake("metalcore::eigh")
def _eigh(A, UPLO="L"):
    _la_check_square("eigh", "A", A)
    if UPLO not in ("L", "l", "U", "u"):
        raise ValueError(f"metalcore.eigh: 'UPLO' must be 'L' or 'U', got '{UPLO}'")
    dt = _la_dtype(A)
    return (
        A.new_empty(A.shape[:-1], dtype=dt),
        A.new_empty(A.shape, dtype=dt),
        A.new_empty(A.shape[:-2], dtype=torch.int32),
    )


@register_fake("metalcore::svd")
def _svd(A, full_matrices=True):
    _la_check_matrix("svd", "A", A)
    dt = _la_dtype(A)
    batch = A.shape[:-2]
    m, n = A.shape[-2], A.shape[-1]
    k = torch.sym_min(m, n)
    return (
        A.new_empty((*batch, m, m if full_matrices else k), dtype=dt),
        A.new_empty((*batch, k), dtype=dt),
        A.new_empty((*batch, n if full_matrices else k, n), dtype=dt),
        A.new_empty(batch, dtype=torch.int32),
    )


# --- Weight-only quantization (csrc/quant/quant.h) ---------------------------------------------

from ._checks import check_defined  # noqa: E402  (this family's block stays in one place)

# ggml type id -> (name, weights per block, bytes per block).
_GGUF_TYPES = {
    2: ("Q4_0", 32, 18),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    14: ("Q6_K", 256, 210),
}


def _quant_uint8_matrix(op: str, arg: str, t, ref_arg: str, ref, shape: str) -> None:
    check_defined(op, arg, t)
    if t.dtype != torch.uint8:
        raise TypeError(f"metalcore.{op}: '{arg}' must be uint8, got {dtype_name(t.dtype)}")
    check_same_device(op, arg, t, ref_arg, ref)
    if t.dim() != 2:
        raise ValueError(f"metalcore.{op}: '{arg}' must be 2-D {shape}, got shape {sizes(t)}")


def _quant_affine(op: str, bits: int, qweight, scales, biases, group, ref_arg: str, ref):
    """Returns (out_features, in_features); the checks of quant::check_affine."""
    shape = "[out_features, in_features / 2]" if bits == 4 else "[out_features, in_features]"
    _quant_uint8_matrix(op, "qweight", qweight, ref_arg, ref, shape)
    check_float(op, "scales", scales)
    check_same_device(op, "scales", scales, ref_arg, ref)
    check_float(op, "biases", biases)
    check_same_device(op, "biases", biases, ref_arg, ref)
    check_same_dtype(op, "biases", biases, "scales", scales)
    if group not in (32, 64, 128):
        raise ValueError(f"metalcore.{op}: 'group_size' must be 32, 64 or 128, got {group}")
    n = qweight.shape[0]
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    torch._check_value(
        k % group == 0,
        lambda: (
            f"metalcore.{op}: in_features ({k}, from 'qweight') must be a multiple of "
            f"'group_size' ({group})"
        ),
    )
    torch._check_value(
        scales.dim() == 2 and scales.shape[0] == n and scales.shape[1] == k // group,
        lambda: (
            f"metalcore.{op}: 'scales' must have shape [{n}, {k // group}] (out_features, "
            f"in_features / group_size), got {sizes(scales)}"
        ),
    )
    check_same_shape(op, "biases", biases, "scales", scales)
    return n, k


def _quant_gguf(op: str, data, qtype, ref_arg: str, ref):
    """Returns (out_features, in_features); the checks of quant::check_gguf."""
    _quant_uint8_matrix(op, "data", data, ref_arg, ref, "[out_features, row_bytes]")
    if qtype not in _GGUF_TYPES:
        raise ValueError(
            f"metalcore.{op}: 'qtype' must be a supported ggml type: 2 (Q4_0), 8 (Q8_0), "
            f"12 (Q4_K) or 14 (Q6_K), got {qtype}"
        )
    name, block, nbytes = _GGUF_TYPES[qtype]
    torch._check_value(
        data.shape[1] % nbytes == 0,
        lambda: (
            f"metalcore.{op}: each row of 'data' must be whole {name} blocks (a multiple of "
            f"{nbytes} bytes), got {data.shape[1]} bytes"
        ),
    )
    return data.shape[0], data.shape[1] // nbytes * block


def _quant_activation(op: str, arg: str, x, want, what: str) -> None:
    check_float(op, arg, x)
    check_dim_at_least(op, arg, x, 1)
    torch._check_value(
        x.shape[-1] == want,
        lambda: (
            f"metalcore.{op}: the last dim of '{arg}' must be {want} (the weight's {what}), "
            f"got shape {sizes(x)}"
        ),
    )


def _quant_linear_out(op: str, input, bias, n, k):
    _quant_activation(op, "input", input, k, "in_features")
    if bias is not None:
        check_float(op, "bias", bias)
        check_same_device(op, "bias", bias, "input", input)
        check_same_dtype(op, "bias", bias, "input", input)
        torch._check_value(
            bias.dim() == 1 and bias.shape[0] == n,
            lambda: (
                f"metalcore.{op}: 'bias' must have shape [{n}] (out_features), got {sizes(bias)}"
            ),
        )
    return input.new_empty((*input.shape[:-1], n))


def _quant_backward_out(op: str, grad_out, n, k):
    _quant_activation(op, "grad_out", grad_out, n, "out_features")
    return grad_out.new_empty((*grad_out.shape[:-1], k))


def _register_affine_fakes(bits: int) -> None:
    deq, lin, bwd = (f"int{bits}_dequantize", f"int{bits}_linear", f"int{bits}_linear_backward")

    @register_fake(f"metalcore::{deq}")
    def _dequantize(qweight, scales, biases, group_size):
        n, k = _quant_affine(deq, bits, qweight, scales, biases, group_size, "qweight", qweight)
        return qweight.new_empty((n, k), dtype=scales.dtype)

    @register_fake(f"metalcore::{lin}")
    def _linear(input, qweight, scales, biases, group_size, bias=None):
        n, k = _quant_affine(lin, bits, qweight, scales, biases, group_size, "input", input)
        return _quant_linear_out(lin, input, bias, n, k)

    @register_fake(f"metalcore::{bwd}")
    def _linear_backward(grad_out, qweight, scales, biases, group_size):
        n, k = _quant_affine(bwd, bits, qweight, scales, biases, group_size, "grad_out", grad_out)
        return _quant_backward_out(bwd, grad_out, n, k)


_register_affine_fakes(4)
_register_affine_fakes(8)


@register_fake("metalcore::gguf_dequantize")
def _gguf_dequantize(data, qtype, dtype=None):
    n, k = _quant_gguf("gguf_dequantize", data, qtype, "data", data)
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(
            "metalcore.gguf_dequantize: 'dtype' must be float16, bfloat16, float32 or float64, "
            f"got {dtype_name(dtype)}"
        )
    return data.new_empty((n, k), dtype=dtype)


@register_fake("metalcore::gguf_linear")
def _gguf_linear(input, data, qtype, bias=None):
    n, k = _quant_gguf("gguf_linear", data, qtype, "input", input)
    return _quant_linear_out("gguf_linear", input, bias, n, k)


@register_fake("metalcore::gguf_linear_backward")
def _gguf_linear_backward(grad_out, data, qtype):
    n, k = _quant_gguf("gguf_linear_backward", data, qtype, "grad_out", grad_out)
    return _quant_backward_out("gguf_linear_backward", grad_out, n, k)


# --- LayerNorm (csrc/layer_norm/layer_norm.h) ----------------------------------------------------


def _ln_check_affine(op: str, arg: str, t, input_name: str, input) -> None:
    if t is None:
        return
    n = input.shape[-1]
    check_same_device(op, arg, t, input_name, input)
    check_same_dtype(op, arg, t, input_name, input)
    torch._check_value(
        t.dim() == 1 and t.shape[0] == n,
        lambda: (
            f"metalcore.{op}: '{arg}' must have shape [{n}] (the last dim of "
            f"'{input_name}'), got {sizes(t)}"
        ),
    )


def _ln_check_inputs(op: str, input, weight, bias, eps, input_name: str = "input") -> None:
    check_float(op, input_name, input)
    check_dim_at_least(op, input_name, input, 1)
    check_eps(op, eps)
    _ln_check_affine(op, "weight", weight, input_name, input)
    _ln_check_affine(op, "bias", bias, input_name, input)


def _ln_backward(op: str, x_arg: str, grad_out, grad_res, x, weight, bias, eps):
    _ln_check_inputs(op, x, weight, bias, eps, x_arg)
    _check_like(op, "grad_out", grad_out, x_arg, x)
    if grad_res is not None:
        _check_like(op, "grad_residual_out", grad_res, x_arg, x)
    check_metal_dtype(op, x_arg, x)
    n = x.shape[-1]
    return (
        _new_like(x),
        x.new_empty((n if weight is not None else 0,)),
        x.new_empty((n if bias is not None else 0,)),
    )


@register_fake("metalcore::layer_norm")
def _layer_norm(input, weight, bias, eps):
    _ln_check_inputs("layer_norm", input, weight, bias, eps)
    check_metal_dtype("layer_norm", "input", input)
    return _new_like(input)


@register_fake("metalcore::layer_norm_backward")
def _layer_norm_backward(grad_out, input, weight, bias, eps):
    return _ln_backward("layer_norm_backward", "input", grad_out, None, input, weight, bias, eps)


@register_fake("metalcore::fused_add_layer_norm")
def _fused_add_layer_norm(input, residual, weight, bias, eps):
    op = "fused_add_layer_norm"
    _ln_check_inputs(op, input, weight, bias, eps)
    check_float(op, "residual", residual)
    _check_like(op, "residual", residual, "input", input)
    check_metal_dtype(op, "input", input)
    return _new_like(input), _new_like(input)


@register_fake("metalcore::fused_add_layer_norm_backward")
def _fused_add_layer_norm_backward(grad_out, grad_residual_out, residual_out, weight, bias, eps):
    return _ln_backward(
        "fused_add_layer_norm_backward",
        "residual_out",
        grad_out,
        grad_residual_out,
        residual_out,
        weight,
        bias,
        eps,
    )


# --- Attention (csrc/attention/attention.h) ----------------------------------------------------


from . import _checks  # noqa: E402  (this family's block stays in one place)


def _attn_shape(s) -> str:
    return "[" + ", ".join(str(x) for x in s) + "]"


def _attn_lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_attention(op, q, k, v, mask, scale, is_causal, window_left, window_right):
    """The checks of attention::check_inputs, in its order; returns (B, Hq, Lq, Dv)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(op, name, t)
    check_same_device(op, "k", k, "q", q)
    check_same_device(op, "v", v, "q", q)
    check_same_dtype(op, "k", k, "q", q)
    check_same_dtype(op, "v", v, "q", q)
    if mask is not None:
        check_same_device(op, "attn_mask", mask, "q", q)
        if mask.dtype not in (torch.bool, q.dtype):
            raise TypeError(
                f"metalcore.{op}: 'attn_mask' must be bool or have the dtype of 'q' "
                f"({dtype_name(q.dtype)}), got {dtype_name(mask.dtype)}"
            )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"metalcore.{op}: '{name}' must be 4-D [batch, heads, seq, head_dim], "
                f"got shape {sizes(t)}"
            )
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    torch._check_value(
        k.shape[0] == b and k.shape[3] == d,
        lambda: (
            f"metalcore.{op}: 'k' must have the batch and head_dim of 'q' {sizes(q)}, "
            f"got shape {sizes(k)}"
        ),
    )
    torch._check_value(
        v.shape[0] == b and v.shape[1] == hkv and v.shape[2] == lk,
        lambda: (
            f"metalcore.{op}: 'v' must have the batch, heads and seq of 'k' {sizes(k)}, "
            f"got shape {sizes(v)}"
        ),
    )
    torch._check_value(
        hq == 0 if hkv == 0 else hq % hkv == 0,
        lambda: f"metalcore.{op}: the heads of 'k' ({hkv}) must divide the heads of 'q' ({hq})",
    )
    if mask is not None:
        target = (b, hq, lq, lk)
        ok = mask.dim() <= 4 and all(
            mask.shape[mask.dim() - 1 - i] == 1 or mask.shape[mask.dim() - 1 - i] == target[3 - i]
            for i in range(mask.dim())
        )
        torch._check_value(
            ok,
            lambda: (
                f"metalcore.{op}: 'attn_mask' must be broadcastable to [batch, q_heads, q_seq, "
                f"kv_seq] = {_attn_shape(target)}, got shape {sizes(mask)}"
            ),
        )
    if scale is not None and not (abs(scale) < float("inf")):  # NaN fails too
        raise ValueError(f"metalcore.{op}: 'scale' must be finite, got {fmt_float(scale)}")
    if window_left < -1 or window_right < -1:
        raise ValueError(
            f"metalcore.{op}: 'window_left' and 'window_right' must be >= -1 (-1: unbounded), "
            f"got ({window_left}, {window_right})"
        )
    if is_causal and (window_left != -1 or window_right != -1):
        raise ValueError(
            f"metalcore.{op}: 'is_causal' (top-left) cannot be combined with a window "
            "(bottom-right); use window_left=-1, window_right=0 for bottom-right causal"
        )
    if is_causal and mask is not None:
        raise ValueError(
            f"metalcore.{op}: 'is_causal' cannot be combined with 'attn_mask' (fold the causal "
            "mask into it)"
        )
    return b, hq, lq, v.shape[3]


@register_fake("metalcore::attention")
def _attention(
    q, k, v, attn_mask=None, scale=None, is_causal=False, window_left=-1, window_right=-1
):
    b, hq, lq, dv = _check_attention(
        "attention", q, k, v, attn_mask, scale, is_causal, window_left, window_right
    )
    return q.new_empty((b, hq, lq, dv)), q.new_empty((b, hq, lq), dtype=_attn_lse_dtype(q.dtype))


@register_fake("metalcore::attention_backward")
def _attention_backward(
    grad_out, grad_lse, q, k, v, out, lse, attn_mask, scale, is_causal, window_left, window_right
):
    op = "attention_backward"
    b, hq, lq, dv = _check_attention(
        op, q, k, v, attn_mask, scale, is_causal, window_left, window_right
    )
    out_shape, lse_shape = (b, hq, lq, dv), (b, hq, lq)
    for arg, t in (("grad_out", grad_out), ("out", out)):
        check_float(op, arg, t)
        check_same_device(op, arg, t, "q", q)
        check_same_dtype(op, arg, t, "q", q)
        torch._check_value(
            t.dim() == 4 and all(x == y for x, y in zip(t.shape, out_shape)),
            lambda arg=arg, t=t: (
                f"metalcore.{op}: '{arg}' must have shape [batch, q_heads, q_seq, v_head_dim] = "
                f"{_attn_shape(out_shape)}, got {sizes(t)}"
            ),
        )
    lse_type = _attn_lse_dtype(q.dtype)
    for arg, t in (("lse", lse), ("grad_lse", grad_lse)):
        if t is None and arg == "grad_lse":
            continue
        _checks.check_defined(op, arg, t)
        check_same_device(op, arg, t, "q", q)
        if t.dtype != lse_type:
            raise TypeError(
                f"metalcore.{op}: '{arg}' must be {dtype_name(lse_type)} (lse's dtype for "
                f"{dtype_name(q.dtype)} inputs), got {dtype_name(t.dtype)}"
            )
        torch._check_value(
            t.dim() == 3 and all(x == y for x, y in zip(t.shape, lse_shape)),
            lambda arg=arg, t=t: (
                f"metalcore.{op}: '{arg}' must have shape [batch, q_heads, q_seq] = "
                f"{_attn_shape(lse_shape)}, got {sizes(t)}"
            ),
        )
    return _new_like(q), _new_like(k), _new_like(v)


# --- Softmax (csrc/softmax/softmax.h) ----------------------------------------------------------


def _softmax_wrap_dim(op: str, t, dim: int, arg: str) -> None:
    nd = max(t.dim(), 1)
    if not -nd <= dim < nd:
        raise ValueError(
            f"metalcore.{op}: 'dim' must be in [{-nd}, {nd - 1}] for the {t.dim()}-D '{arg}', "
            f"got {dim}"
        )


@register_fake("metalcore::softmax")
def _softmax(input, dim):
    check_float("softmax", "input", input)
    _softmax_wrap_dim("softmax", input, dim, "input")
    check_metal_dtype("softmax", "input", input)
    return _new_like(input)


@register_fake("metalcore::log_softmax")
def _log_softmax(input, dim):
    check_float("log_softmax", "input", input)
    _softmax_wrap_dim("log_softmax", input, dim, "input")
    check_metal_dtype("log_softmax", "input", input)
    return _new_like(input)


def _softmax_backward_fake(op: str, grad_out, output, dim):
    check_float(op, "output", output)
    check_float(op, "grad_out", grad_out)
    _check_like(op, "grad_out", grad_out, "output", output)
    _softmax_wrap_dim(op, output, dim, "output")
    check_metal_dtype(op, "output", output)
    return _new_like(output)


@register_fake("metalcore::softmax_backward")
def _softmax_backward(grad_out, output, dim):
    return _softmax_backward_fake("softmax_backward", grad_out, output, dim)


@register_fake("metalcore::log_softmax_backward")
def _log_softmax_backward(grad_out, output, dim):
    return _softmax_backward_fake("log_softmax_backward", grad_out, output, dim)


# --- Cross-entropy (csrc/cross_entropy/cross_entropy.h) ----------------------------------------


def _ce_reduction(op: str, reduction: str) -> None:
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(
            f"metalcore.{op}: 'reduction' must be 'none', 'sum' or 'mean', got '{reduction}'"
        )


def _ce_smoothing(op: str, label_smoothing) -> None:
    torch._check_value(
        0.0 <= label_smoothing <= 1.0,
        lambda: (
            f"metalcore.{op}: 'label_smoothing' must be in [0, 1], got {fmt_float(label_smoothing)}"
        ),
    )


def _ce_logits_target(op: str, input, target, input_name: str = "input") -> None:
    check_float(op, input_name, input)
    if input.dim() != 2:
        raise ValueError(
            f"metalcore.{op}: '{input_name}' must be 2-D [N, C], got shape {sizes(input)}"
        )
    torch._check_value(
        input.shape[1] >= 1,
        lambda: (
            f"metalcore.{op}: '{input_name}' must have at least one class (C >= 1), got shape "
            f"{sizes(input)}"
        ),
    )
    if target is None:
        raise ValueError(f"metalcore.{op}: 'target' must be a tensor, got None")
    if target.dtype != torch.int64:
        raise TypeError(
            f"metalcore.{op}: 'target' must be int64 (Long) class indices, got "
            f"{dtype_name(target.dtype)}"
        )
    check_same_device(op, "target", target, input_name, input)
    n = input.shape[0]
    torch._check_value(
        target.dim() == 1 and target.shape[0] == n,
        lambda: (
            f"metalcore.{op}: 'target' must have shape [{n}] (the N of '{input_name}'), "
            f"got {sizes(target)}"
        ),
    )


@register_fake("metalcore::cross_entropy")
def _cross_entropy(input, target, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    op = "cross_entropy"
    _ce_logits_target(op, input, target)
    _ce_reduction(op, reduction)
    _ce_smoothing(op, label_smoothing)
    check_metal_dtype(op, "input", input)
    # The target values' range is a data check the kernels' entry point makes.
    return input.new_empty((input.shape[0],) if reduction == "none" else ())


@register_fake("metalcore::cross_entropy_backward")
def _cross_entropy_backward(
    grad_loss, input, target, ignore_index=-100, reduction="mean", label_smoothing=0.0
):
    op = "cross_entropy_backward"
    _ce_logits_target(op, input, target)
    _ce_reduction(op, reduction)
    _ce_smoothing(op, label_smoothing)
    check_float(op, "grad_loss", grad_loss)
    check_same_device(op, "grad_loss", grad_loss, "input", input)
    check_same_dtype(op, "grad_loss", grad_loss, "input", input)
    n = input.shape[0]
    if reduction == "none":
        torch._check_value(
            grad_loss.dim() == 1 and grad_loss.shape[0] == n,
            lambda: (
                f"metalcore.{op}: 'grad_loss' must have shape [{n}] (the loss of reduction "
                f"'none'), got {sizes(grad_loss)}"
            ),
        )
    elif grad_loss.dim() != 0:
        raise ValueError(
            f"metalcore.{op}: 'grad_loss' must be 0-dim (the loss of reduction '{reduction}'), "
            f"got shape {sizes(grad_loss)}"
        )
    check_metal_dtype(op, "input", input)
    return input.new_empty(input.shape)


# --- Fused linear + cross-entropy (csrc/cross_entropy/fused_linear_cross_entropy_autograd.cpp) -


def _flce_check(op: str, input, weight, target, bias, reduction, label_smoothing) -> None:
    check_float(op, "input", input)
    if input.dim() != 2:
        raise ValueError(f"metalcore.{op}: 'input' must be 2-D [N, H], got shape {sizes(input)}")
    check_float(op, "weight", weight)
    check_same_device(op, "weight", weight, "input", input)
    check_same_dtype(op, "weight", weight, "input", input)
    h = input.shape[1]
    torch._check_value(
        weight.dim() == 2 and weight.shape[1] == h and weight.shape[0] >= 1,
        lambda: (
            f"metalcore.{op}: 'weight' must have shape [V, {h}] with V >= 1 (H of 'input'), "
            f"got {sizes(weight)}"
        ),
    )
    if target is None:
        raise ValueError(f"metalcore.{op}: 'target' must be a tensor, got None")
    if target.dtype != torch.int64:
        raise TypeError(
            f"metalcore.{op}: 'target' must be int64 (Long) class indices, got "
            f"{dtype_name(target.dtype)}"
        )
    check_same_device(op, "target", target, "input", input)
    n = input.shape[0]
    torch._check_value(
        target.dim() == 1 and target.shape[0] == n,
        lambda: (
            f"metalcore.{op}: 'target' must have shape [{n}] (the N of 'input'), "
            f"got {sizes(target)}"
        ),
    )
    if bias is not None:
        check_same_device(op, "bias", bias, "input", input)
        check_same_dtype(op, "bias", bias, "input", input)
        v = weight.shape[0]
        torch._check_value(
            bias.dim() == 1 and bias.shape[0] == v,
            lambda: (
                f"metalcore.{op}: 'bias' must have shape [{v}] (the V of 'weight'), "
                f"got {sizes(bias)}"
            ),
        )
    _ce_reduction(op, reduction)
    _ce_smoothing(op, label_smoothing)


@register_fake("metalcore::fused_linear_cross_entropy")
def _fused_linear_cross_entropy(
    input, weight, target, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0
):
    _flce_check(
        "fused_linear_cross_entropy", input, weight, target, bias, reduction, label_smoothing
    )
    return input.new_empty((input.shape[0],) if reduction == "none" else ())


@register_fake("metalcore::fused_linear_cross_entropy_backward")
def _fused_linear_cross_entropy_backward(
    grad_loss,
    input,
    weight,
    target,
    bias=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
):
    op = "fused_linear_cross_entropy_backward"
    _flce_check(op, input, weight, target, bias, reduction, label_smoothing)
    check_float(op, "grad_loss", grad_loss)
    check_same_device(op, "grad_loss", grad_loss, "input", input)
    check_same_dtype(op, "grad_loss", grad_loss, "input", input)
    n = input.shape[0]
    if reduction == "none":
        torch._check_value(
            grad_loss.dim() == 1 and grad_loss.shape[0] == n,
            lambda: (
                f"metalcore.{op}: 'grad_loss' must have shape [{n}] (the loss of reduction "
                f"'none'), got {sizes(grad_loss)}"
            ),
        )
    elif grad_loss.dim() != 0:
        raise ValueError(
            f"metalcore.{op}: 'grad_loss' must be 0-dim (the loss of reduction '{reduction}'), "
            f"got shape {sizes(grad_loss)}"
        )
    grad_bias = weight.new_empty((weight.shape[0],) if bias is not None else (0,))
    return input.new_empty(input.shape), weight.new_empty(weight.shape), grad_bias


# --- embedding_bag (csrc/embedding_bag/embedding_bag.h) ----------------------------------------


def _eb_mode(op: str, mode: str) -> None:
    if mode not in ("sum", "mean", "max"):
        raise ValueError(f"metalcore.{op}: 'mode' must be 'sum', 'mean' or 'max', got '{mode}'")


def _eb_index_tensor(op: str, arg: str, t) -> None:
    check_defined(op, arg, t)
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"metalcore.{op}: '{arg}' must be int64 or int32, got {dtype_name(t.dtype)}"
        )
    if t.dim() != 1:
        raise ValueError(f"metalcore.{op}: '{arg}' must be 1-D, got shape {sizes(t)}")


def _eb_check(
    op: str, weight, input, offsets, mode, per_sample_weights, include_last_offset, padding_idx
):
    """Mirrors check_common: returns the number of bags. The values of input and offsets (range,
    order) are a data check the kernels' entry point makes."""
    _eb_mode(op, mode)
    check_float(op, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(
            f"metalcore.{op}: 'weight' must be 2-D [num_embeddings, embedding_dim], got shape "
            f"{sizes(weight)}"
        )
    _eb_index_tensor(op, "input", input)
    _eb_index_tensor(op, "offsets", offsets)
    check_same_device(op, "input", input, "weight", weight)
    check_same_device(op, "offsets", offsets, "weight", weight)
    if offsets.dtype != input.dtype:
        raise TypeError(
            f"metalcore.{op}: 'offsets' must have the same dtype as 'input' "
            f"({dtype_name(input.dtype)}), got {dtype_name(offsets.dtype)}"
        )
    if per_sample_weights is not None:
        check_same_device(op, "per_sample_weights", per_sample_weights, "weight", weight)
        check_same_dtype(op, "per_sample_weights", per_sample_weights, "weight", weight)
        if mode != "sum":
            raise ValueError(
                f"metalcore.{op}: 'per_sample_weights' is only supported with mode 'sum' (as torch)"
            )
        check_same_shape(op, "per_sample_weights", per_sample_weights, "input", input)
    v = weight.shape[0]
    if padding_idx is not None:
        torch._check_value(
            -v <= padding_idx < v,
            lambda: (
                f"metalcore.{op}: 'padding_idx' must be in [-{v}, {v}) (the rows of 'weight'), "
                f"got {padding_idx}"
            ),
        )
    if include_last_offset:
        torch._check_value(
            offsets.shape[0] >= 1,
            lambda: (
                f"metalcore.{op}: 'offsets' must have at least one element with "
                "include_last_offset=True"
            ),
        )
        return offsets.shape[0] - 1
    return offsets.shape[0]


@register_fake("metalcore::embedding_bag")
def _embedding_bag(
    weight,
    input,
    offsets,
    mode="mean",
    per_sample_weights=None,
    include_last_offset=False,
    padding_idx=None,
):
    bags = _eb_check(
        "embedding_bag",
        weight,
        input,
        offsets,
        mode,
        per_sample_weights,
        include_last_offset,
        padding_idx,
    )
    return weight.new_empty((bags, weight.shape[1]))


@register_fake("metalcore::embedding_bag_backward")
def _embedding_bag_backward(
    grad_out,
    weight,
    input,
    offsets,
    mode="mean",
    per_sample_weights=None,
    include_last_offset=False,
    padding_idx=None,
):
    op = "embedding_bag_backward"
    bags = _eb_check(
        op, weight, input, offsets, mode, per_sample_weights, include_last_offset, padding_idx
    )
    v, d = weight.shape
    check_float(op, "grad_out", grad_out)
    check_same_device(op, "grad_out", grad_out, "weight", weight)
    check_same_dtype(op, "grad_out", grad_out, "weight", weight)
    torch._check_value(
        grad_out.dim() == 2 and grad_out.shape[0] == bags and grad_out.shape[1] == d,
        lambda: (
            f"metalcore.{op}: 'grad_out' must have shape [{bags}, {d}] (bags x embedding_dim), "
            f"got {sizes(grad_out)}"
        ),
    )
    n = input.shape[0] if per_sample_weights is not None else 0
    return weight.new_empty((v, d)), weight.new_empty((n,))


# --- LoRA linear (csrc/lora/lora.h) ------------------------------------------------------------

import math  # noqa: E402  (this family's block stays in one place)

from torch.fx.experimental.symbolic_shapes import sym_eq  # noqa: E402


def _lora_check(op: str, input, weight, lora_a, lora_b, bias, scaling):
    """Mirrors lora::check_inputs; returns (in_features, out_features)."""
    check_float(op, "input", input)
    check_dim_at_least(op, "input", input, 1)
    k = input.shape[-1]
    check_float(op, "weight", weight)
    check_same_device(op, "weight", weight, "input", input)
    check_same_dtype(op, "weight", weight, "input", input)
    torch._check_value(
        weight.dim() == 2 and weight.shape[1] == k,
        lambda: (
            f"metalcore.{op}: 'weight' must have shape [out_features, {k}] (the last dim of "
            f"'input'), got {sizes(weight)}"
        ),
    )
    n = weight.shape[0]
    check_float(op, "lora_a", lora_a)
    check_same_device(op, "lora_a", lora_a, "input", input)
    check_same_dtype(op, "lora_a", lora_a, "input", input)
    torch._check_value(
        lora_a.dim() == 2 and lora_a.shape[1] == k,
        lambda: (
            f"metalcore.{op}: 'lora_a' must have shape [r, {k}] (PEFT's layout), got "
            f"{sizes(lora_a)}"
        ),
    )
    r = lora_a.shape[0]
    check_float(op, "lora_b", lora_b)
    check_same_device(op, "lora_b", lora_b, "input", input)
    check_same_dtype(op, "lora_b", lora_b, "input", input)
    torch._check_value(
        lora_b.dim() == 2 and lora_b.shape[0] == n and lora_b.shape[1] == r,
        lambda: (
            f"metalcore.{op}: 'lora_b' must have shape [{n}, {r}] ([out_features, r], PEFT's "
            f"layout), got {sizes(lora_b)}"
        ),
    )
    if bias is not None:
        check_float(op, "bias", bias)
        check_same_device(op, "bias", bias, "input", input)
        check_same_dtype(op, "bias", bias, "input", input)
        torch._check_value(
            bias.dim() == 1 and bias.shape[0] == n,
            lambda: (
                f"metalcore.{op}: 'bias' must have shape [{n}] (out_features), got {sizes(bias)}"
            ),
        )
    if not math.isfinite(scaling):
        raise ValueError(f"metalcore.{op}: 'scaling' must be finite, got {fmt_float(scaling)}")
    return k, n


@register_fake("metalcore::lora_linear")
def _lora_linear(input, weight, lora_a, lora_b, scaling, bias=None):
    _, n = _lora_check("lora_linear", input, weight, lora_a, lora_b, bias, scaling)
    return input.new_empty((*input.shape[:-1], n))


@register_fake("metalcore::lora_linear_backward")
def _lora_linear_backward(
    grad_out, input, weight, lora_a, lora_b, scaling, bias=None, weight_grad=False
):
    op = "lora_linear_backward"
    _, n = _lora_check(op, input, weight, lora_a, lora_b, bias, scaling)
    check_float(op, "grad_out", grad_out)
    check_same_device(op, "grad_out", grad_out, "input", input)
    check_same_dtype(op, "grad_out", grad_out, "input", input)
    shape = (*input.shape[:-1], n)
    torch._check_value(
        grad_out.dim() == len(shape) and sym_eq(grad_out.shape, shape),
        lambda: (
            f"metalcore.{op}: 'grad_out' must have shape [{', '.join(str(s) for s in shape)}] "
            f"(the output's), got {sizes(grad_out)}"
        ),
    )
    return (
        input.new_empty(input.shape),
        weight.new_empty(weight.shape if weight_grad else (0,)),
        lora_a.new_empty(lora_a.shape),
        lora_b.new_empty(lora_b.shape),
        input.new_empty((n,) if bias is not None else (0,)),
    )


# --- Linear algebra, second slice: QR, LU, solve (csrc/linalg/linalg.h) ------------------------


@register_fake("metalcore::qr")
def _qr(A, mode="reduced"):
    _la_check_matrix("qr", "A", A)
    if mode not in ("reduced", "complete", "r"):
        raise ValueError(f"metalcore.qr: 'mode' must be 'reduced', 'complete' or 'r', got '{mode}'")
    dt = _la_dtype(A)
    batch = A.shape[:-2]
    m, n = A.shape[-2], A.shape[-1]
    k = torch.sym_min(m, n)
    rows = m if mode == "complete" else k
    Q = A.new_empty((0,), dtype=dt) if mode == "r" else A.new_empty((*batch, m, rows), dtype=dt)
    return Q, A.new_empty((*batch, rows, n), dtype=dt)


from ._checks import dtype_name as _la_dtype_name  # noqa: E402  (this block stays in one place)


@register_fake("metalcore::lu_factor_ex")
def _lu_factor_ex(A):
    _la_check_matrix("lu_factor_ex", "A", A)
    batch = A.shape[:-2]
    k = torch.sym_min(A.shape[-2], A.shape[-1])
    return (
        A.new_empty(A.shape, dtype=_la_dtype(A)),
        A.new_empty((*batch, k), dtype=torch.int32),
        A.new_empty(batch, dtype=torch.int32),
    )


def _la_solve_shape(op, A, B, left, a_name="A"):
    n = A.shape[-1]
    shared = B.shape[-2] if left else B.shape[-1]
    side = "rows (A X = B" if left else "columns (X A = B"
    torch._check_value(
        shared == n,
        lambda: (
            f"metalcore.{op}: 'B' must have {n} {side} with A of size {n}), got shape {sizes(B)}"
        ),
    )
    a_batch, b_batch = list(A.shape[:-2]), list(B.shape[:-2])
    nd = max(len(a_batch), len(b_batch))
    a_batch = [1] * (nd - len(a_batch)) + a_batch
    b_batch = [1] * (nd - len(b_batch)) + b_batch
    out = []
    for sa, sb in zip(a_batch, b_batch):
        torch._check_value(
            sa == sb or sa == 1 or sb == 1,
            lambda: (
                f"metalcore.{op}: the batch dims of '{a_name}' {sizes(A)} and 'B' {sizes(B)} "
                "must broadcast"
            ),
        )
        out.append(sb if sa == 1 else sa)
    return out


@register_fake("metalcore::lu_solve")
def _lu_solve(LU, pivots, B, left=True, adjoint=False):
    op = "lu_solve"
    _la_check_square(op, "LU", LU)
    _la_check_matrix(op, "B", B)
    check_same_device(op, "B", B, "LU", LU)
    check_same_device(op, "pivots", pivots, "LU", LU)
    check_same_dtype(op, "B", B, "LU", LU)
    if pivots.dtype != torch.int32:
        raise TypeError(
            f"metalcore.{op}: 'pivots' must be int32 (as lu_factor returns them), got "
            f"{_la_dtype_name(pivots.dtype)}"
        )
    want = list(LU.shape[:-1])
    torch._check_value(
        list(pivots.shape) == want,
        lambda: (
            f"metalcore.{op}: 'pivots' must have shape {want} (LU's batch and size), got "
            f"{sizes(pivots)}"
        ),
    )
    batch = _la_solve_shape(op, LU, B, left, "LU")
    return LU.new_empty((*batch, B.shape[-2], B.shape[-1]), dtype=_la_dtype(LU))


@register_fake("metalcore::solve_ex")
def _solve_ex(A, B, left=True):
    op = "solve_ex"
    _la_check_square(op, "A", A)
    _la_check_matrix(op, "B", B)
    check_same_device(op, "B", B, "A", A)
    check_same_dtype(op, "B", B, "A", A)
    batch = _la_solve_shape(op, A, B, left)
    return (
        A.new_empty((*batch, B.shape[-2], B.shape[-1]), dtype=_la_dtype(A)),
        A.new_empty(A.shape[:-2], dtype=torch.int32),
    )
