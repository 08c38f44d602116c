"""Hugging Face transformers integration: ``patch(model)`` and its reversible handle.

``patch(model)`` routes the RMSNorms, the rotary embedding and the MLP activation of Llama,
Mistral, Qwen2 and Qwen3 models through the metalcore ops, in place and for that model only:

* **Instance-level.** Each patched module gets its own ``forward`` (a bound method stored on
  the instance); classes, other models and the ``transformers`` modules are untouched. When
  accelerate hooks are attached (``_hf_hook``), the hooked ``_old_forward`` is replaced, so
  hooks, parameters and module objects all stay as they are.
* **Rotary.** Attention forwards call the module-level ``apply_rotary_pos_emb`` of their
  modeling file. A patched attention instance runs a copy of its class's forward function
  whose globals are a private copy of the modeling module's namespace in which that one name
  is metalcore's. The copy has no ``__name__``, so ``torch.compile`` reads globals from it
  rather than re-importing the modeling module (which would silently trace the original).
* **Exact fallbacks.** Each replacement runs the original forward where the op does not apply
  (weights in another dtype than the activations, a device without a metalcore kernel, an
  unusual rotary layout), so a patched model computes what the original does, up to one
  rounding.

``handle.undo()`` restores every attribute it set (``forward`` disappears from the instance
``__dict__`` again). Gemma-style ``(1 + w)`` norms and other unknown classes are left alone
and listed in ``handle.skipped``.

``patch_classes()`` is the explicit global variant: it replaces the forwards of the supported
transformers classes, for every model (including ones created later), and is reversible the
same way.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import functional as mf
from .._dispatch import KERNEL_DTYPES, has_kernel
from ..nn.rmsnorm import RMSNorm as MetalcoreRMSNorm
from ..nn.rmsnorm import _kernel_applies
from ..nn.rotary import rope_kernel_applies

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
_MISSING = object()
_MARK = "_metalcore_patch"  # set on every replacement function, to recognise our own patches


def _family(module: torch.nn.Module, suffix: str) -> str | None:
    cls = type(module)
    for fam, prefix in _PREFIX.items():
        if cls.__name__ == prefix + suffix and cls.__module__.startswith(
            f"transformers.models.{fam}."
        ):
            return fam
    return None


# --- Replacement forwards ------------------------------------------------------------------
# Each takes the original forward (a callable taking the module first) and returns the new
# one; the original runs whenever the op does not cover the inputs.


def _rmsnorm_forward(orig: Callable[..., Tensor]) -> Callable[..., Tensor]:
    # transformers' LlamaRMSNorm: weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype).
    # The op rounds once instead of twice: equal within one rounding of x.dtype.
    def forward(self: torch.nn.Module, hidden_states: Tensor) -> Tensor:
        w = self.weight
        if (
            hidden_states.dtype in KERNEL_DTYPES
            and w.dtype == hidden_states.dtype
            and w.dim() == 1
            and hidden_states.dim() >= 1
            and hidden_states.shape[-1] == w.shape[0]
            and has_kernel("rmsnorm", hidden_states.device.type)
        ):
            return mf.rmsnorm(hidden_states, w, self.variance_epsilon)
        return orig(self, hidden_states)

    setattr(forward, _MARK, True)
    return forward


def _mlp_forward(orig: Callable[..., Tensor]) -> Callable[..., Tensor]:
    # transformers' LlamaMLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)) with act_fn = silu.
    def forward(self: torch.nn.Module, x: Tensor) -> Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if (
            gate.dtype == up.dtype
            and gate.shape == up.shape
            and gate.dtype in KERNEL_DTYPES
            and has_kernel("swiglu", gate.device.type)
        ):
            return self.down_proj(mf.swiglu(gate, up))
        return self.down_proj(self.act_fn(gate) * up)

    setattr(forward, _MARK, True)
    return forward


def _rotary_function(orig: Callable[..., Any]) -> Callable[..., Any]:
    """metalcore's stand-in for a modeling file's ``apply_rotary_pos_emb(q, k, cos, sin,
    unsqueeze_dim=1)``: q/k ``[B, H, S, D]``, cos/sin ``[B, S, D]``."""

    @functools.wraps(orig)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        # Older signatures pass position_ids positionally; only the default layout is fused.
        if (
            not args
            and set(kwargs) <= {"unsqueeze_dim"}
            and kwargs.get("unsqueeze_dim", 1) == 1
            and rope_kernel_applies(q, k, cos, sin)
        ):
            return mf.rope(q, k, cos, sin)
        return orig(q, k, cos, sin, *args, **kwargs)

    setattr(apply_rotary_pos_emb, _MARK, True)
    return apply_rotary_pos_emb


_ROTARY_NAME = "apply_rotary_pos_emb"


def _with_rotary_global(fn: Callable[..., Any], scopes: dict[int, dict]) -> Callable[..., Any]:
    """A copy of ``fn`` (and of the decorators wrapped around it) whose body resolves the
    global ``apply_rotary_pos_emb`` to metalcore's. Raises ``LookupError`` when ``fn`` does not
    call it or wraps it in a way that cannot be rebuilt."""
    chain = [fn]
    while isinstance(chain[-1], types.FunctionType) and hasattr(chain[-1], "__wrapped__"):
        chain.append(chain[-1].__wrapped__)
    idx = next(
        (
            i
            for i in range(len(chain) - 1, -1, -1)
            if isinstance(chain[i], types.FunctionType)
            and _ROTARY_NAME in chain[i].__code__.co_names
        ),
        None,
    )
    if idx is None:
        raise LookupError(f"the forward does not call {_ROTARY_NAME}")
    target = chain[idx]
    globs = target.__globals__
    scope = scopes.get(id(globs))
    if scope is None:
        # A private namespace: the modeling module's names, with ours for the rotary function.
        # Without __name__, torch.compile resolves globals from this dict, not the module.
        scope = {k: v for k, v in globs.items() if k != "__name__"}
        scope[_ROTARY_NAME] = _rotary_function(globs[_ROTARY_NAME])
        scopes[id(globs)] = scope
    new = _copy_function(target, globals_=scope)
    for outer in reversed(chain[:idx]):
        old_inner = chain[chain.index(outer) + 1]
        cells = outer.__closure__ or ()
        if not any(_cell_is(c, old_inner) for c in cells):
            raise LookupError(f"cannot rebuild the decorator {outer.__qualname__}")
        closure = tuple(types.CellType(new) if _cell_is(c, old_inner) else c for c in cells)
        new_outer = _copy_function(outer, closure=closure)
        new_outer.__wrapped__ = new
        new = new_outer
    setattr(new, _MARK, True)
    return new


def _cell_is(cell: types.CellType, value: Any) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # empty cell
        return False


def _copy_function(fn: types.FunctionType, globals_=None, closure=None) -> types.FunctionType:
    new = types.FunctionType(
        fn.__code__,
        fn.__globals__ if globals_ is None else globals_,
        fn.__name__,
        fn.__defaults__,
        fn.__closure__ if closure is None else closure,
    )
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    new.__module__ = fn.__module__
    new.__doc__ = fn.__doc__
    new.__dict__.update(fn.__dict__)
    return new


# --- Handle ----------------------------------------------------------------------------------


@dataclass
class PatchHandle:
    """What :func:`patch` (or :func:`patch_classes`) changed, and how to undo it.

    ``patched`` maps ``"rmsnorm"``, ``"rope"`` and ``"mlp"`` to the names of the patched
    modules (classes, for ``patch_classes``); ``skipped`` maps names to the reason they were
    left alone. Usable as a context manager (``with metalcore.patch(model): ...``).
    """

    patched: dict[str, list[str]] = field(
        default_factory=lambda: {"rmsnorm": [], "rope": [], "mlp": []}
    )
    skipped: dict[str, str] = field(default_factory=dict)
    _records: list[tuple[Any, str, Any, Any]] = field(default_factory=list, repr=False)
    active: bool = True

    def _set(self, obj: Any, attr: str, value: Any) -> None:
        self._records.append((obj, attr, obj.__dict__.get(attr, _MISSING), value))
        setattr(obj, attr, value)

    def undo(self) -> None:
        """Restores every attribute this handle set, in reverse order. Idempotent."""
        for obj, attr, previous, ours in reversed(self._records):
            if obj.__dict__.get(attr, _MISSING) is not ours:
                warnings.warn(
                    f"metalcore.patch: {type(obj).__name__}.{attr} was changed after "
                    "patching; restoring the original anyway",
                    stacklevel=2,
                )
            if previous is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, previous)
        self._records.clear()
        self.active = False

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()

    def summary(self) -> str:
        counts = ", ".join(f"{len(v)} {k}" for k, v in self.patched.items())
        return f"metalcore.patch: {counts} patched; {len(self.skipped)} skipped"


def _instance_patch(handle: PatchHandle, module: torch.nn.Module, make: Callable) -> None:
    # accelerate's add_hook_to_module moves the real forward to `_old_forward` and puts a hook
    # wrapper in `forward`; patching `_old_forward` keeps the hook in front of our code.
    attr = "forward"
    if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__:
        attr = "_old_forward"
    current = getattr(module, attr)  # bound method (class or instance level)
    if getattr(getattr(current, "__func__", current), _MARK, False):
        raise _AlreadyPatched
    orig = lambda self, *args, **kwargs: current(*args, **kwargs)  # noqa: E731
    handle._set(module, attr, types.MethodType(make(orig), module))


class _AlreadyPatched(Exception):
    pass


def _silu_act(module: torch.nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def patch(
    model: torch.nn.Module, *, rmsnorm: bool = True, rope: bool = True, mlp: bool = True
) -> PatchHandle:
    """Routes a transformers Llama/Mistral/Qwen2/Qwen3 model through the metalcore ops, in
    place, and returns a :class:`PatchHandle` whose ``undo()`` restores the original.

    Patches, per module instance: the family's ``*RMSNorm`` (with its own
    ``variance_epsilon``; Qwen3's q/k norms included) and any ``torch.nn.RMSNorm``; the
    attention's rotary application (``metalcore.rope``); the MLP's ``act_fn(gate) * up``
    (``metalcore.swiglu``, only when ``act_fn`` is SiLU). Parameters, buffers, hooks and module
    objects are unchanged, so ``state_dict``, optimizers and accelerate keep working. Nothing
    global is modified; see :func:`patch_classes` for that.
    """
    handle = PatchHandle()
    scopes: dict[int, dict] = {}
    for name, module in model.named_modules():
        label = name or "<root>"
        cls = type(module).__name__
        try:
            if rmsnorm and _family(module, "RMSNorm") and hasattr(module, "variance_epsilon"):
                _instance_patch(handle, module, _rmsnorm_forward)
                handle.patched["rmsnorm"].append(label)
            elif isinstance(module, MetalcoreRMSNorm):
                continue  # already runs the op
            elif rmsnorm and isinstance(module, torch.nn.RMSNorm):
                _instance_patch(handle, module, _torch_rmsnorm_forward)
                handle.patched["rmsnorm"].append(label)
            elif rmsnorm and "Norm" in cls and not isinstance(module, torch.nn.RMSNorm):
                handle.skipped[label] = f"{cls}: not a Llama-style RMSNorm, left untouched"
            elif mlp and _family(module, "MLP"):
                if _silu_act(module):
                    _instance_patch(handle, module, _mlp_forward)
                    handle.patched["mlp"].append(label)
                else:
                    act = type(getattr(module, "act_fn", None)).__name__
                    handle.skipped[label] = f"{cls}: activation {act} is not SiLU"
            elif rope and _family(module, "Attention"):
                try:
                    fn = _with_rotary_global(type(module).forward, scopes)
                except LookupError as e:
                    handle.skipped[label] = f"{cls}: rotary not patched ({e})"
                    continue
                _instance_patch(handle, module, lambda orig, fn=fn: fn)
                handle.patched["rope"].append(label)
        except _AlreadyPatched:
            handle.skipped[label] = f"{cls}: already patched by metalcore"
    return handle


def _torch_rmsnorm_forward(orig: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def forward(self: torch.nn.RMSNorm, x: Tensor) -> Tensor:
        if _kernel_applies("rmsnorm", self, x, self.weight):
            return mf.rmsnorm(x, self.weight, self.eps)
        return orig(self, x)

    setattr(forward, _MARK, True)
    return forward


def patch_classes(families: Iterable[str] = FAMILIES) -> PatchHandle:
    """Globally replaces the forwards of the RMSNorm, MLP and attention classes of the given
    transformers model families (every instance, existing or future). Explicit opt-in only;
    ``undo()`` restores the classes. Prefer :func:`patch` for a single model."""
    import importlib

    handle = PatchHandle()
    scopes: dict[int, dict] = {}
    for fam in families:
        if fam not in _PREFIX:
            raise ValueError(f"metalcore.patch_classes: unknown family {fam!r} (known: {FAMILIES})")
        mod = importlib.import_module(f"transformers.models.{fam}.modeling_{fam}")
        prefix = _PREFIX[fam]
        for suffix, kind, make in (
            ("RMSNorm", "rmsnorm", _rmsnorm_forward),
            ("MLP", "mlp", _mlp_forward),
            ("Attention", "rope", None),
        ):
            cls = getattr(mod, prefix + suffix, None)
            if cls is None:
                handle.skipped[f"{fam}.{prefix}{suffix}"] = "class not found"
                continue
            orig = cls.__dict__["forward"]
            if getattr(orig, _MARK, False):
                handle.skipped[cls.__qualname__] = "already patched by metalcore"
                continue
            if make is None:
                try:
                    new = _with_rotary_global(orig, scopes)
                except LookupError as e:
                    handle.skipped[cls.__qualname__] = f"rotary not patched ({e})"
                    continue
            elif kind == "mlp":
                new = _class_mlp_forward(orig)
            else:
                new = make(orig)
            handle._set(cls, "forward", new)
            handle.patched[kind].append(f"{cls.__module__}.{cls.__qualname__}")
    return handle


def _class_mlp_forward(orig: Callable[..., Tensor]) -> Callable[..., Tensor]:
    # At class level the activation is only known per instance: non-SiLU MLPs run the original.
    fused = _mlp_forward(orig)

    def forward(self: torch.nn.Module, x: Tensor) -> Tensor:
        return fused(self, x) if _silu_act(self) else orig(self, x)

    setattr(forward, _MARK, True)
    return forward
