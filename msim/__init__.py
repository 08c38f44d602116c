"""msim: compile Metal Shading Language kernels with clang and run them on CPU fibers.

A developer/CI tool (not shipped in the wheel): see msim/README.md.
"""

from .build import BuildError, build, check, tsan_runtime
from .host import Buffer, Encoder, Kernel, Library, MetalError

__all__ = [
    "Buffer",
    "BuildError",
    "Encoder",
    "Kernel",
    "Library",
    "MetalError",
    "build",
    "check",
    "load",
    "tsan_runtime",
]


def load(metal_files, include_dirs=(), mode: str = "default", defines=(), kernels=None) -> Library:
    """Build (cached) and open a kernel library in one step (`kernels`: host names to keep)."""
    return Library(build(metal_files, include_dirs, mode, defines, kernels))
