"""The kernel sources and the host names: strict compile of every .metal file and one naming
scheme on both sides. (The test ops take the user-facing schemas from the one op table,
csrc/ops.def, so they cannot drift apart.)"""

from __future__ import annotations

import pytest

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
