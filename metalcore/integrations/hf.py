"""Hugging Face transformers integration: ``patch(model)`` and its reversible handle.

``patch(model)`` routes the RMSNorms, the rotary embedding, the MLP activation and (in training
with labels) the LM head + loss of Llama, Mistral, Qwen2 and Qwen3 models through the metalcore
ops, in place and for that model only:

* **Instance-level.** Each patched module gets its own ``forward`` (a small callable object
  stored on the instance); classes, other models and the ``transformers`` modules are
  untouched. When accelerate hooks are attached (``_hf_hook``), the hooked ``_old_forward`` is
  replaced, so hooks, parameters and module objects all stay as they are.
* **Copies.** That object holds its module and the forward the instance ran before, never a
  closure over them, so ``copy.deepcopy``, ``pickle`` and ``torch.save``/``torch.load`` of a
  patched model give a patched model that computes with its own weights on every path.
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
import inspect
import types
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import functional as mf
from .._dispatch import kernel_applies
from ..nn.layernorm import LayerNorm as MetalcoreLayerNorm
from ..nn.layernorm import layer_norm_kernel_applies
from ..nn.rmsnorm import RMSNorm as MetalcoreRMSNorm
from ..nn.rmsnorm import _kernel_applies, default_eps
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


# --- What the patched forwards compute ------------------------------------------------------
# Each returns metalcore's result, or None where the op does not cover the inputs; the caller
# then runs the module's original forward, so results and errors there stay transformers'.


def _hf_rmsnorm(module: torch.nn.Module, hidden_states: Tensor) -> Tensor | None:
    # transformers' LlamaRMSNorm: weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype).
    # The op rounds once instead of twice: equal within one rounding of x.dtype.
    w = module.weight
    if (
        w.dim() == 1
        and hidden_states.dim() >= 1
        and hidden_states.shape[-1] == w.shape[0]
        and kernel_applies("rmsnorm", hidden_states, w)
    ):
        return mf.rmsnorm(hidden_states, w, module.variance_epsilon)
    return None


def _torch_rmsnorm(module: torch.nn.RMSNorm, x: Tensor) -> Tensor | None:
    if _kernel_applies("rmsnorm", module, x):
        eps = default_eps(x.dtype) if module.eps is None else module.eps
        return mf.rmsnorm(x, module.weight, eps)
    return None


def _hf_mlp(module: torch.nn.Module, x: Tensor) -> Tensor:
    # transformers' LlamaMLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)) with act_fn = silu.
    # Its fallback is that formula itself, so the projections are not computed twice.
    gate, up = module.gate_proj(x), module.up_proj(x)
    if gate.shape == up.shape and kernel_applies("swiglu", gate, up):
        return module.down_proj(mf.swiglu(gate, up))
    return module.down_proj(module.act_fn(gate) * up)


# --- Instance-level forwards -----------------------------------------------------------------


class _PatchedForward:
    """The ``forward`` (or accelerate's ``_old_forward``) that :func:`patch` stores on one
    module instance.

    An object rather than a closure or a bound method so that copies of a patched model are
    patched copies computing with their own weights: it holds the module and the forward the
    instance ran before, which ``copy.deepcopy`` maps to the copy's own (a closure would keep
    calling the original module), and it pickles by reference to module-level code (a closure
    does not pickle at all). A previous forward that was a method of this module is kept as
    its function and called with ``self.module``, so it follows the module into copies too.
    """

    def __init__(self, module: torch.nn.Module, previous: Callable[..., Any]) -> None:
        self.module = module
        if isinstance(previous, types.MethodType) and previous.__self__ is module:
            self.previous, self.previous_is_method = previous.__func__, True
        else:
            self.previous, self.previous_is_method = previous, False

    def original(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the forward the instance had before it was patched."""
        if self.previous_is_method:
            return self.previous(self.module, *args, **kwargs)
        return self.previous(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        # inspect.signature(module.forward) reads as it did before the patch.
        sig = inspect.signature(self.previous)
        if self.previous_is_method:
            sig = sig.replace(parameters=list(sig.parameters.values())[1:])
        return sig

    def __repr__(self) -> str:
        return f"<metalcore {type(self).__name__} of {type(self.module).__name__}>"


class _RMSNormForward(_PatchedForward):
    def __call__(self, hidden_states: Tensor) -> Tensor:
        out = _hf_rmsnorm(self.module, hidden_states)
        return self.original(hidden_states) if out is None else out


class _TorchRMSNormForward(_PatchedForward):
    def __call__(self, x: Tensor) -> Tensor:
        out = _torch_rmsnorm(self.module, x)
        return self.original(x) if out is None else out


class _TorchLayerNormForward(_PatchedForward):
    # torch.nn.LayerNorm instances (GPT-2's ln_1/ln_2/ln_f, BERT's LayerNorm): the op computes
    # F.layer_norm's formula with float32 accumulation, rounding once.
    def __call__(self, x: Tensor) -> Tensor:
        m = self.module
        if isinstance(x, Tensor) and layer_norm_kernel_applies("layer_norm", m, x):
            return mf.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
        return self.original(x)


class _MLPForward(_PatchedForward):
    def __call__(self, x: Tensor) -> Tensor:
        return _hf_mlp(self.module, x)


class _CausalLMLossForward(_PatchedForward):
    """A ``*ForCausalLM`` forward that, in training with ``labels``, computes the LM head and
    the loss as one ``metalcore.fused_linear_cross_entropy`` over chunks of tokens, so the
    [tokens, vocab] logits (4 GiB in float32 for 8K tokens x 128K vocab) and their gradient
    never exist. It then returns ``logits=None``, as Liger-Kernel's fused loss does; in eval mode,
    without labels, or with arguments it does not handle, the original forward runs unchanged."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        m = self.module
        call = self._fused_call(args, kwargs)
        if call is None:
            return self.original(*args, **kwargs)
        model_kwargs, labels, loss_kwargs = call
        outputs = m.model(**model_kwargs)
        hidden = outputs.last_hidden_state
        head = m.lm_head
        if not _lm_loss_applies(hidden, head, labels):
            # Another dtype or device: the logits as transformers computes them, then its loss.
            logits = head(hidden)
            loss = m.loss_function(
                logits=logits, labels=labels, vocab_size=m.config.vocab_size, **loss_kwargs
            )
            return _causal_lm_output(outputs, loss, logits)
        ignore_index = loss_kwargs.get("ignore_index", -100)
        num_items = loss_kwargs.get("num_items_in_batch")
        shift_labels = loss_kwargs.get("shift_labels")
        if shift_labels is None:  # tokens < n predict token n, as ForCausalLMLoss shifts them
            shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        reduction = "mean" if num_items is None else "sum"
        loss = mf.fused_linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            head.weight,
            shift_labels.reshape(-1).to(hidden.device),
            head.bias,
            ignore_index=ignore_index,
            reduction=reduction,
        ).float()  # transformers' loss is float32 whatever the model dtype
        if num_items is not None:
            loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
        return _causal_lm_output(outputs, loss, None)

    def _fused_call(self, args: tuple, kwargs: dict) -> tuple[dict, Tensor, dict] | None:
        """(the base model's kwargs, labels, the loss's kwargs) for the fused path, or None."""
        m = self.module
        if not m.training:
            return None
        try:
            bound = self.__signature__.bind(*args, **kwargs)
        except TypeError:
            return None  # let the original forward raise its own error
        named = dict(bound.arguments)
        extra = {}
        for p in self.__signature__.parameters.values():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                extra = named.pop(p.name, {})
            elif p.kind is inspect.Parameter.VAR_POSITIONAL and named.pop(p.name, ()):
                return None
        labels = named.pop("labels", None)
        keep = named.pop("logits_to_keep", 0)
        if not isinstance(labels, Tensor) or not (isinstance(keep, int) and keep == 0):
            return None  # no loss, or logits for a slice of the positions only
        if extra.get("return_dict") is False or m.loss_function.__name__ != "ForCausalLMLoss":
            return None  # a tuple output, or a model whose loss is not plain next-token CE
        loss_keys = ("num_items_in_batch", "ignore_index", "shift_labels")
        loss_kwargs = {k: extra.pop(k) for k in loss_keys if k in extra}
        return {**named, **extra}, labels, loss_kwargs


def _lm_loss_applies(hidden: Tensor, head: torch.nn.Module, labels: Tensor) -> bool:
    return (
        isinstance(head, torch.nn.Linear)
        and hidden.dim() >= 2
        and labels.dtype == torch.int64
        and kernel_applies("fused_linear_cross_entropy", hidden, head.weight, head.bias)
    )


def _causal_lm_output(outputs: Any, loss: Tensor, logits: Tensor | None) -> Any:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    # The base model's other fields (cache, hidden states, attentions) under their own names,
    # which are the causal-LM output's too in every transformers version.
    rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
    return CausalLMOutputWithPast(loss=loss, logits=logits, **rest)


class _RotaryForward(_PatchedForward):
    """Runs a copy of the class's forward in which ``apply_rotary_pos_emb`` is metalcore's.
    The copy is a function with private globals, which pickle cannot store by reference: it is
    rebuilt from the class's forward when the object is unpickled or deep-copied."""

    def __init__(
        self, module: torch.nn.Module, previous: Callable[..., Any], scopes: dict[int, dict]
    ) -> None:
        super().__init__(module, previous)
        self.source = type(module).forward
        self._forward = _with_rotary_global(self.source, scopes)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(self.module, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_forward"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._forward = _with_rotary_global(self.source, _REBUILT_SCOPES)


# The private namespaces of rotary forwards rebuilt by unpickling or deep-copying, shared by all
# of them in this process as one patch() call shares its own.
_REBUILT_SCOPES: dict[int, dict] = {}


# --- Class-level forwards (patch_classes) ----------------------------------------------------


def _class_forward(orig: Callable[..., Tensor], compute: Callable[..., Tensor | None]):
    def forward(self: torch.nn.Module, x: Tensor) -> Tensor:
        out = compute(self, x)
        return orig(self, x) if out is None else out

    setattr(forward, _MARK, True)
    return forward


def _class_mlp_forward(orig: Callable[..., Tensor]) -> Callable[..., Tensor]:
    # At class level the activation is only known per instance: non-SiLU MLPs run the original.
    def forward(self: torch.nn.Module, x: Tensor) -> Tensor:
        return _hf_mlp(self, x) if _silu_act(self) else orig(self, x)

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


# --- Attention backend ----------------------------------------------------------------------

ATTENTION = "metalcore"
"""The name under which :func:`register_attention` adds metalcore's attention to transformers
(``attn_implementation="metalcore"``)."""


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention-function contract (``AttentionInterface``) computed by
    ``metalcore.scaled_dot_product_attention``: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] without
    repeating the key/value heads, the boolean mask transformers builds for SDPA (or ``None`` and
    the causal flag), output [B, Lq, Hq, Dv]. What the op does not cover (softcapping, position
    biases, attention sinks) runs transformers' own SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "s_aux", "sinks")):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    q_length, kv_length = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' SDPA path: the causal flag only for a prefill without a mask (a decode
    # step's one query sees every cached key), with keys past the queries cropped (an empty
    # static cache), since the flag is F.sdpa's top-left diagonal.
    causal = bool(q_length > 1 and attention_mask is None and causal)
    if causal and kv_length > q_length:
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    out = mf.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=causal,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Registers :func:`attention_forward` with transformers as ``"metalcore"`` (with SDPA's
    mask construction) and returns that name: ``from_pretrained(..., attn_implementation=
    "metalcore")`` or ``model.set_attn_implementation("metalcore")`` then use it. Idempotent."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION


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
    # Changes made through an API rather than an attribute: (undo callable), run in reverse.
    _undos: list[Callable[[], Any]] = field(default_factory=list, repr=False)
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
        for undo in reversed(self._undos):
            undo()
        self._undos.clear()
        self.active = False

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()

    def summary(self) -> str:
        counts = ", ".join(f"{len(v)} {k}" for k, v in self.patched.items())
        return f"metalcore.patch: {counts} patched; {len(self.skipped)} skipped"


def _instance_patch(
    handle: PatchHandle, module: torch.nn.Module, kind: type[_PatchedForward], *extra: Any
) -> None:
    # accelerate's add_hook_to_module moves the real forward to `_old_forward` and puts a hook
    # wrapper in `forward`; patching `_old_forward` keeps the hook in front of our code.
    attr = "forward"
    if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__:
        attr = "_old_forward"
    current = getattr(module, attr)  # bound method (class or instance level) or ours
    if isinstance(current, _PatchedForward) or getattr(
        getattr(current, "__func__", current), _MARK, False
    ):
        raise _AlreadyPatched
    handle._set(module, attr, kind(module, current, *extra))


class _AlreadyPatched(Exception):
    pass


def _silu_act(module: torch.nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def patch(
    model: torch.nn.Module,
    *,
    rmsnorm: bool = True,
    rope: bool = True,
    mlp: bool = True,
    layer_norm: bool = True,
    lm_loss: bool = True,
    attention: bool = True,
) -> PatchHandle:
    """Routes a transformers Llama/Mistral/Qwen2/Qwen3 model through the metalcore ops, in
    place, and returns a :class:`PatchHandle` whose ``undo()`` restores the original.

    Patches, per module instance: the family's ``*RMSNorm`` (with its own
    ``variance_epsilon``; Qwen3's q/k norms included) and any ``torch.nn.RMSNorm``; the
    attention's rotary application (``metalcore.rope``); the MLP's ``act_fn(gate) * up``
    (``metalcore.swiglu``, only when ``act_fn`` is SiLU); with ``layer_norm``, every
    ``torch.nn.LayerNorm`` (GPT-2, BERT, ViT, Whisper; listed under ``patched["layer_norm"]``,
    a key present only when one was patched); with ``lm_loss``, the ``*ForCausalLM``'s LM head
    and loss in training with ``labels`` (``metalcore.fused_linear_cross_entropy``: the logits
    are never materialized and ``outputs.logits`` is None; listed under ``patched["lm_loss"]``);
    with ``attention``, a transformers model running ``"sdpa"`` attention switches to
    :func:`attention_forward` (``"metalcore"``; listed under ``patched["attention"]``; models
    set to eager or flash attention keep their choice).
    Parameters, buffers, hooks and module
    objects are unchanged, so ``state_dict``, optimizers and accelerate keep working. Nothing
    global is modified; see :func:`patch_classes` for that.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"metalcore.patch: 'model' must be a torch.nn.Module, got {type(model).__name__}"
        )
    handle = PatchHandle()
    if attention:
        _switch_attention(handle, model)
    scopes: dict[int, dict] = {}  # one private namespace per modeling module, for this patch
    for name, module in model.named_modules():
        label = name or "<root>"
        cls = type(module).__name__
        try:
            if rmsnorm and _family(module, "RMSNorm") and hasattr(module, "variance_epsilon"):
                _instance_patch(handle, module, _RMSNormForward)
                handle.patched["rmsnorm"].append(label)
            elif isinstance(module, MetalcoreRMSNorm):
                continue  # already runs the op
            elif rmsnorm and isinstance(module, torch.nn.RMSNorm):
                _instance_patch(handle, module, _TorchRMSNormForward)
                handle.patched["rmsnorm"].append(label)
            elif isinstance(module, MetalcoreLayerNorm):
                continue  # already runs the op
            elif layer_norm and isinstance(module, torch.nn.LayerNorm):
                _instance_patch(handle, module, _TorchLayerNormForward)
                handle.patched.setdefault("layer_norm", []).append(label)
            elif isinstance(module, torch.nn.LayerNorm):
                continue  # layer_norm=False: a LayerNorm is not an unknown norm
            elif rmsnorm and "Norm" in cls and not isinstance(module, torch.nn.RMSNorm):
                handle.skipped[label] = f"{cls}: not a Llama-style RMSNorm, left untouched"
            elif mlp and _family(module, "MLP"):
                if _silu_act(module):
                    _instance_patch(handle, module, _MLPForward)
                    handle.patched["mlp"].append(label)
                else:
                    act = type(getattr(module, "act_fn", None)).__name__
                    handle.skipped[label] = f"{cls}: activation {act} is not SiLU"
            elif lm_loss and _family(module, "ForCausalLM"):
                if isinstance(getattr(module, "lm_head", None), torch.nn.Linear) and hasattr(
                    module, "model"
                ):
                    _instance_patch(handle, module, _CausalLMLossForward)
                    handle.patched.setdefault("lm_loss", []).append(label)
                else:
                    handle.skipped[label] = f"{cls}: LM head is not a torch.nn.Linear"
            elif rope and _family(module, "Attention"):
                try:
                    _instance_patch(handle, module, _RotaryForward, scopes)
                except LookupError as e:
                    handle.skipped[label] = f"{cls}: rotary not patched ({e})"
                    continue
                handle.patched["rope"].append(label)
        except _AlreadyPatched:
            handle.skipped[label] = f"{cls}: already patched by metalcore"
    return handle


def _switch_attention(handle: PatchHandle, model: torch.nn.Module) -> None:
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return  # not a transformers model, or one set to eager/flash attention on purpose
    if not hasattr(model, "set_attn_implementation"):
        return
    model.set_attn_implementation(register_attention())
    handle._undos.append(functools.partial(model.set_attn_implementation, "sdpa"))
    handle.patched.setdefault("attention", []).append(type(model).__name__)


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
        for suffix, kind in (("RMSNorm", "rmsnorm"), ("MLP", "mlp"), ("Attention", "rope")):
            cls = getattr(mod, prefix + suffix, None)
            if cls is None:
                handle.skipped[f"{fam}.{prefix}{suffix}"] = "class not found"
                continue
            orig = cls.__dict__["forward"]
            if getattr(orig, _MARK, False):
                handle.skipped[cls.__qualname__] = "already patched by metalcore"
                continue
            if kind == "rope":
                try:
                    new = _with_rotary_global(orig, scopes)
                except LookupError as e:
                    handle.skipped[cls.__qualname__] = f"rotary not patched ({e})"
                    continue
            elif kind == "mlp":
                new = _class_mlp_forward(orig)
            else:
                new = _class_forward(orig, _hf_rmsnorm)
            handle._set(cls, "forward", new)
            handle.patched[kind].append(f"{cls.__module__}.{cls.__qualname__}")
    return handle
