"""The export demo (examples/export_llama.py): .pt2 and AOTInductor round trips."""

import importlib.util

import pytest

from tests.support import REPO


def _demo():
    spec = importlib.util.spec_from_file_location("export_llama", REPO / "examples/export_llama.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_export_demo_pt2_in_fresh_process(tmp_path):
    diffs = _demo().export_demo(tmp_path, aoti=False)
    assert diffs == {"pt2": 0.0}  # same kernels, same float32 math: bitwise equal
    assert (tmp_path / "tiny_llama.pt2").exists()


@pytest.mark.slow
def test_export_demo_aot_inductor_package(tmp_path):
    diffs = _demo().export_demo(tmp_path, aoti=True)
    assert diffs["aoti"] < 1e-4 and (tmp_path / "tiny_llama_aoti.pt2").exists()
