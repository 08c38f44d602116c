"""The Metal launch layer runs the same entry points as the CPU and CUDA backends (the family
headers csrc/<family>/<family>.h), so a bad input gets the same exception and message through the
Metal path as on the CPU. The exception: an input the Metal backend cannot run at all (float64)
gets the Metal backend's own message."""

import copy

import pytest

from metalcore.testing.op_specs import SPECS
from tests.support import raised, tensors_in

CASES = [
    (name, i)
    for name in sorted(SPECS)
    for i in range(len(SPECS[name].bad_inputs))
    if SPECS[name].namespace == "metalcore"
]


# Differences that come from msim running on CPU tensors, not from the launch layer.
MSIM_ONLY = {
    ("adamw", "negative lr"): "msim's device is the CPU, so a CPU lr is a device lr there: the "
    "kernel reads it and the host does not range-check it (as for a CUDA or MPS lr tensor)",
}


@pytest.mark.parametrize(
    "op,case", CASES, ids=[f"{n}-{SPECS[n].bad_inputs[i].description}" for n, i in CASES]
)
def test_metal_path_raises_the_cpu_error(mops, op, case):
    spec = SPECS[op]
    if not hasattr(mops, op):
        pytest.skip(f"metalcore_msim has no {op}")
    bad = spec.bad_inputs[case]
    if (op, bad.description) in MSIM_ONLY:
        pytest.skip(MSIM_ONLY[op, bad.description])
    args, kwargs = bad.make()
    if any(t.device.type != "cpu" for t in tensors_in([args, kwargs])):
        pytest.skip("the msim ops only have CPU-key kernels; device routing is the dispatcher's")
    cpu_err = raised(spec.overload(), *copy.deepcopy(args), **copy.deepcopy(kwargs))
    metal_err = raised(getattr(mops, op).default, *args, **kwargs)
    assert cpu_err is not None and metal_err is not None, (cpu_err, metal_err)
    if "on the Metal backend" in str(metal_err):
        pytest.skip(f"the Metal backend rejects this input earlier: {metal_err}")
    assert type(metal_err) is type(cpu_err)
    assert str(metal_err) == str(cpu_err)
