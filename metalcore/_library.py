"""Locates and loads the native library (``libmetalcore_ops``).

The library is Python-free: it only links libtorch, so the same file serves ``import metalcore``
(through ``torch.ops.load_library``) and C++ AOTInductor runners (through ``dlopen``). Loading it
runs its static ``TORCH_LIBRARY`` registrations: every ``metalcore::`` schema, the CPU kernels,
the autograd kernels and, where built, the MPS/CUDA kernels.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

_NAMES = ("libmetalcore_ops.so", "libmetalcore_ops.dylib", "metalcore_ops.dll")


def _candidates() -> list[Path]:
    found: list[Path] = []
    env = os.environ.get("METALCORE_LIBRARY")
    if env:
        found.append(Path(env))
    # The package folder(s): the installed wheel, an in-place developer build, or an editable
    # install whose compiled files live in site-packages while the sources stay in the checkout.
    here = Path(__file__).resolve().parent
    search = [here]
    for entry in sys.path:
        p = Path(entry or ".") / "metalcore"
        if p.is_dir() and p.resolve() != here:
            search.append(p)
    for folder in search:
        found.extend(folder / name for name in _NAMES)
    return found


def library_path() -> Path:
    """Path of the native library that ``import metalcore`` loads."""
    for path in _candidates():
        if path.is_file():
            return path
    raise ImportError(
        "metalcore: the native library libmetalcore_ops was not found next to the package. "
        "Build it with `pip install --no-build-isolation -e .` (or set METALCORE_LIBRARY)."
    )


_loaded: Path | None = None


def load() -> Path:
    global _loaded
    if _loaded is None:
        path = library_path()
        torch.ops.load_library(str(path))
        _loaded = path
    return _loaded
