"""Wheel metadata: a metalcore wheel requires the torch minor it was built against.

The native library compiles against libtorch's C++ headers, whose API and ABI change between torch
minor releases (``at::mps::dispatch_sync_with_rethrow`` moved between them, for one), so a build
works with that minor only. scikit-build-core calls this provider (``[[tool.dynamic-metadata]]`` in
pyproject.toml) and writes ``Requires-Dist: torch==<major>.<minor>.*`` into the wheel.

The torch read here is the building environment's: metalcore is built with ``pip install
--no-build-isolation``, so pip never installs a torch for the build and CMake compiles against
this same one. An isolated build has no torch (it is deliberately absent from
``build-system.requires``) and stops here with the command to use instead. ``import metalcore``
makes the matching check at run time against the record CMake writes next to the library
(metalcore/_library.py).
"""

from __future__ import annotations

import re
from typing import Any

# The oldest torch whose C++ API the sources compile against.
MIN_TORCH = (2, 11)


def torch_minor(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise RuntimeError(f"metalcore: cannot read a torch version from {version!r}")
    return int(m.group(1)), int(m.group(2))


def building_torch_version() -> str:
    try:
        import torch
    except ImportError as e:
        raise RuntimeError(
            "metalcore: the build compiles against the torch installed in the building "
            "environment, and there is none (an isolated build environment never has one). "
            "Install torch first, then build without isolation: "
            "`pip install torch && pip install --no-build-isolation .` "
            "(or `pip wheel --no-build-isolation --no-deps .`)."
        ) from e
    return torch.__version__


class TorchRequirement:
    """scikit-build-core dynamic-metadata provider of ``dependencies``."""

    def __init__(self) -> None:
        self.state = "wheel"

    def build_state(self, build_state: str) -> None:
        self.state = build_state

    def dynamic_wheel(self, settings: dict[str, Any]) -> dict[str, bool]:
        # An sdist's requirement is the range it builds with; each wheel narrows it to one minor.
        return {"dependencies": True}

    def dynamic_metadata(self, settings: dict[str, Any], project: Any) -> dict[str, list[str]]:
        floor = "torch>={}.{}".format(*MIN_TORCH)
        if self.state == "sdist":
            return {"dependencies": [floor]}
        version = building_torch_version()
        major, minor = torch_minor(version)
        if (major, minor) < MIN_TORCH:
            raise RuntimeError(
                f"metalcore: building needs {floor}, but the building environment has torch "
                f"{version}"
            )
        return {"dependencies": [f"torch=={major}.{minor}.*"]}
