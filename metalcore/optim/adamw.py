"""``metalcore.optim.AdamW``: ``torch.optim.AdamW`` whose step is one fused metalcore op."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam

from .._dispatch import kernel_applies


def _dense(t: Tensor) -> bool:
    """No gaps and no overlap: the strides, sorted, are those of some contiguous layout."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _kernel_layout_ok(p: Tensor, grad: Tensor) -> bool:
    # The kernels walk storage order: the param must be dense and its grad laid out the same
    # (states are created with the param's layout). Anything else takes torch's path.
    if p.is_contiguous() and grad.is_contiguous():
        return True
    return _dense(p) and p.stride() == grad.stride()


def _float(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2 parameters, their grads and states), else ``t``.

    AdamW is elementwise, so updating each rank's shard in place is the full update; a
    ``Partial`` placement (unreduced values) would not be, and is refused.
    """
    # Only a process that imported DTensor can hold one; importing it here would cost seconds.
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is None or not isinstance(t, dtensor.DTensor):
        return t
    if any(pl.is_partial() for pl in t.placements):
        raise RuntimeError(
            "metalcore.optim.AdamW: a DTensor with a Partial placement cannot be updated "
            f"shard by shard (placements {t.placements})"
        )
    return t.to_local()


class AdamW(torch.optim.AdamW):
    """Drop-in replacement for ``torch.optim.AdamW`` with a fused step.

    Same constructor, ``param_groups`` and state (``step`` as a 0-dim float32 tensor,
    ``exp_avg``, ``exp_avg_sq`` and, with ``amsgrad``, ``max_exp_avg_sq``, in the parameter's
    dtype), so a ``state_dict`` saved by either optimizer loads into the other, and LR
    schedulers work unchanged. It is a subclass of ``torch.optim.AdamW``.

    Each ``step()`` updates every parameter of a param group on one device with a single
    ``metalcore::adamw`` launch. ``lr`` may be a 0-dim tensor: the op reads it as a tensor, so
    a compiled ``step`` does not recompile when a scheduler changes it. Parameters on a device
    without a metalcore kernel, or laid out so that the kernel cannot walk them (overlapping
    or gapped views, a grad with other strides than its param), are updated by torch's own
    AdamW implementation instead.

    Arguments as ``torch.optim.AdamW``. Differences:

    * ``foreach`` and ``fused`` are accepted and ignored: the step is always fused. They are
      stored as ``None`` so that a ``state_dict`` loaded into ``torch.optim.AdamW`` picks
      torch's default implementation.
    * ``capturable=True`` and ``differentiable=True`` raise ``NotImplementedError``.
    * Complex parameters raise ``TypeError``; sparse gradients raise ``RuntimeError``.
    * Tensor ``betas`` are read as Python floats at each step.

    FSDP2 (``fully_shard``) parameters are DTensors: the step updates each rank's local shard
    (AdamW is elementwise), and the state tensors are DTensors like torch's.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        if capturable:
            raise NotImplementedError(
                "metalcore.optim.AdamW: capturable=True is not supported (the step reads "
                "`step` and `lr` as tensors already; CUDA-graph capture is not implemented)"
            )
        if differentiable:
            raise NotImplementedError(
                "metalcore.optim.AdamW: differentiable=True is not supported (the fused step "
                "has no autograd); use torch.optim.AdamW(differentiable=True)"
            )
        del foreach, fused  # always fused; see the class docstring
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            foreach=None,
            capturable=False,
            differentiable=False,
            fused=None,
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if torch.is_complex(p):
                raise TypeError(
                    "metalcore.optim.AdamW: complex parameters are not supported "
                    f"(got {p.dtype}); use torch.optim.AdamW or view_as_real"
                )

    def _init_state(self, p: Tensor, amsgrad: bool) -> dict[str, Tensor]:
        state = self.state[p]
        if len(state) == 0:
            # Same keys, dtypes and placement as torch.optim.AdamW (step: float32 on CPU).
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:
            if amsgrad and "max_exp_avg_sq" not in state:
                # amsgrad switched on after some steps (as torch: start the max from zero).
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            step = state["step"]
            if isinstance(step, Tensor) and not step.is_floating_point():
                # An integer step from a loaded state_dict, which torch's AdamW steps as it is:
                # the op counts in float32 or float64 (exact to 2**24 steps in float32, as
                # torch's own float32 steps).
                state["step"] = step.to(torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Performs one optimization step (``closure`` re-evaluates the model, as in torch)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            amsgrad, maximize = group["amsgrad"], group["maximize"]
            beta1, beta2 = (_float(b) for b in group["betas"])
            # One bucket per (device, path): each kernel bucket is one op launch.
            buckets: dict[tuple[torch.device, bool], list[list[Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "metalcore.optim.AdamW does not support sparse gradients, please "
                        "consider torch.optim.SparseAdam instead"
                    )
                state = self._init_state(p, amsgrad)
                kernel = kernel_applies("adamw", p, p.grad) and _kernel_layout_ok(p, p.grad)
                lists = buckets.setdefault((p.device, kernel), [[], [], [], [], [], []])
                if kernel:  # the op takes plain tensors: DTensors contribute their shards
                    lists[0].append(_local(p))
                    lists[1].append(_local(p.grad))
                    lists[2].append(_local(state["exp_avg"]))
                    lists[3].append(_local(state["exp_avg_sq"]))
                    if amsgrad:
                        lists[4].append(_local(state["max_exp_avg_sq"]))
                else:
                    lists[0].append(p)
                    lists[1].append(p.grad)
                    lists[2].append(state["exp_avg"])
                    lists[3].append(state["exp_avg_sq"])
                    if amsgrad:
                        lists[4].append(state["max_exp_avg_sq"])
                if kernel and p.device.type != "cpu" and state["step"].device != p.device:
                    # GPU kernels read and bump the step on the device (the Metal one requires
                    # it), as torch's fused AdamW keeps it; a CPU step from a torch state_dict
                    # moves there once.
                    state["step"] = state["step"].to(p.device)
                lists[5].append(state["step"])

            for (_device, kernel), (ps, gs, m1, m2, mx, steps) in buckets.items():
                if kernel:
                    lr = group["lr"]
                    if not isinstance(lr, Tensor):
                        lr = torch.tensor(float(lr), dtype=torch.float64)
                    torch.ops.metalcore.adamw(
                        ps,
                        gs,
                        m1,
                        m2,
                        mx,
                        steps,
                        lr,
                        beta1,
                        beta2,
                        float(group["weight_decay"]),
                        float(group["eps"]),
                        amsgrad,
                        maximize,
                    )
                else:
                    _torch_adam(
                        ps,
                        gs,
                        m1,
                        m2,
                        mx,
                        steps,
                        foreach=False,
                        decoupled_weight_decay=True,
                        amsgrad=amsgrad,
                        beta1=beta1,
                        beta2=beta2,
                        lr=group["lr"],
                        weight_decay=group["weight_decay"],
                        eps=group["eps"],
                        maximize=maximize,
                    )
        return loss
