"""Helpers for the users'-layer tests (modules, optimizer, integrations)."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from metalcore._dispatch import has_kernel

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(
    not HAS_TRANSFORMERS, reason="transformers is not installed (optional extra 'hf')"
)


class OpCounter(TorchDispatchMode):
    """Counts the ``metalcore::`` ops that reach a kernel inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("metalcore."):
            self.counts[name.removeprefix("metalcore.")] += 1
        return func(*args, **(kwargs or {}))


def has_cpu_kernel(op: str) -> bool:
    return has_kernel(op, "cpu")


def needs_kernel(op: str):
    """Skips until the op's CPU kernel is in the build (rope, adamw land separately)."""
    return pytest.mark.skipif(not has_cpu_kernel(op), reason=f"metalcore::{op} has no CPU kernel")


@pytest.fixture(autouse=True)
def one_thread():
    """Runs each test with one intra-op thread (autouse where a conftest imports it).

    The users'-layer tests use tiny models, for which extra threads only add synchronisation:
    on a busy 2-core runner they make each training step about ten times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
