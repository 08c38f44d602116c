"""Locates and loads the native library (``libmetalcore_ops``).

The library is Python-free: it only links libtorch, so the same file serves ``import metalcore``
(through ``torch.ops.load_library``) and C++ AOTInductor runners (through ``dlopen``). Loading it
runs its static ``TORCH_LIBRARY`` registrations: every ``metalcore::`` schema, the CPU kernels,
the autograd kernels and, where built, the MPS/CUDA kernels.

The library works with the torch minor it was compiled against only (libtorch's C++ API and ABI
change between minors). The build writes that torch's version next to it (``BUILD_RECORD``,
CMakeLists.txt), and ``load`` compares it with the running torch before loading: a mismatch is an
ImportError that says what to do, rather than an undefined-symbol error from the dynamic loader
or a crash inside an op.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import torch

_NAMES = ("libmetalcore_ops.so", "libmetalcore_ops.dylib", "metalcore_ops.dll")
# Written by CMake next to the library: {"torch_version": "<torch.__version__ of the build>"}.
BUILD_RECORD = "metalcore_build.json"


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


def _minor(version: str) -> str:
    m = re.match(r"\d+\.\d+", version)
    return m.group(0) if m else version


def check_torch_version(path: Path, running: str | None = None) -> None:
    """Raises ImportError when the library at ``path`` was built against another torch minor than
    the running one (``running``: ``torch.__version__`` unless given). A library without a record
    (built by hand outside CMakeLists.txt) is not checked."""
    running = torch.__version__ if running is None else running
    record = path.with_name(BUILD_RECORD)
    try:
        built = json.loads(record.read_text())["torch_version"]
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ImportError(f"metalcore: cannot read the build record {record}: {e!r}") from e
    if _minor(built) == _minor(running):
        return
    raise ImportError(
        f"metalcore: the native library {path} was built against torch {built}, but this process "
        f"runs torch {running}. The library only works with the torch minor it was compiled "
        f"against ({_minor(built)}.x): install torch=={_minor(built)}.* or rebuild metalcore "
        "against this torch (`pip install --no-build-isolation -e .`, or "
        "`bash scripts/setup.sh` in a checkout)."
    )


_loaded: Path | None = None


def load() -> Path:
    global _loaded
    if _loaded is None:
        path = library_path()
        check_torch_version(path)
        torch.ops.load_library(str(path))
        _loaded = path
    return _loaded
