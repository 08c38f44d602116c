"""The kernel sources and the host names: strict compile of every .metal file, one naming
scheme on both sides, and the test ops mirroring the user-facing schemas."""

from __future__ import annotations

import pytest
import torch

from .conftest import KERNELS


@pytest.mark.parametrize("metal", sorted(p.name for p in KERNELS.glob("*.metal")))
def test_strict_address_spaces(mops, metal):
    # MSL address spaces become distinct clang address spaces: mixing device, constant,
    # threadgroup and thread pointers is a compile error, as in Apple's compiler.
    import msim

    msim.check([KERNELS / metal], include_dirs=[KERNELS])


def test_launch_layer_names_exist_in_library(mops):
    launch = set(mops.launch_kernel_names())
    library = set(mops.library_kernel_names())
    assert launch - library == set(), "launch layer selects kernels the library lacks"
    assert library - launch == set(), "kernels no launch path can select"


# Every metalcore op that has Metal kernels.
METAL_OPS = [
    "rmsnorm", "rmsnorm_backward", "fused_add_rmsnorm", "fused_add_rmsnorm_backward",
    "silu", "silu_backward", "gelu", "gelu_backward", "swiglu", "swiglu_backward",
    "rope", "rope_backward", "adamw",
]  # fmt: skip


@pytest.mark.parametrize("name", METAL_OPS)
def test_msim_ops_mirror_metalcore_schemas(mops, name):
    mine = str(getattr(mops, name).default._schema)
    theirs = str(getattr(torch.ops.metalcore, name).default._schema)
    assert mine.replace("metalcore_msim::", "metalcore::", 1) == theirs
