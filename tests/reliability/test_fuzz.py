"""Cross-backend fuzzing of every metalcore op against its float64 reference: the numerics of
the op contract (its other checks are tests/ops/test_contract.py's).

Every op registered in the dispatcher under ``metalcore::`` must have a spec in
``metalcore.testing.op_specs`` (so a new op without coverage fails here). For each op and each
device of the ``device`` fixture (cpu always; msim, cuda and mps where present, otherwise
skipped with what they need), hypothesis draws shapes, dtypes, memory layouts, storage offsets,
magnitudes across decades and special values, and the outputs must match the float64 reference
within the op's tolerance (one table, ``op_specs.ROUNDING``), with inputs left untouched and
outputs freshly written (allocations are NaN-poisoned while the op runs).

Example counts: ``METALCORE_FUZZ_EXAMPLES`` (default: 5x the hypothesis profile's max_examples,
50 per op and device in CI), ``METALCORE_FUZZ_MSIM_EXAMPLES`` for msim (default 1x: the
simulator runs one fiber per GPU thread); the ``long`` profile (METALCORE_HYPOTHESIS_PROFILE=long)
is the on-demand deep run. A failure prints the sample and a ``@reproduce_failure`` blob, and is
kept in the hypothesis example database, so the next run retries it first.
"""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import assume, note, settings

from metalcore.testing import backends as bk
from metalcore.testing.op_specs import SPECS, HypothesisDrawer, registered_ops, sample
from tests.support import run_examples, runs_op

FUZZ_EXAMPLES = int(os.environ.get("METALCORE_FUZZ_EXAMPLES", 5 * settings.default.max_examples))
MSIM_EXAMPLES = int(os.environ.get("METALCORE_FUZZ_MSIM_EXAMPLES", settings.default.max_examples))


def test_every_registered_op_has_a_spec():
    registered = registered_ops("metalcore")
    assert registered, "no metalcore ops registered: is the native library loaded?"
    missing = sorted(registered - SPECS.keys())
    assert not missing, (
        f"ops without a reliability spec: {missing}. Add an OpSpec for each to "
        "metalcore/testing/op_specs.py (inputs, float64 reference, tolerances, bad inputs)."
    )


def test_every_spec_names_a_registered_op():
    stale = sorted(SPECS.keys() - registered_ops("metalcore"))
    assert not stale, f"specs for ops that are not registered: {stale}"


def test_every_op_has_bad_input_cases():
    assert all(spec.bad_inputs for spec in SPECS.values())


@pytest.mark.parametrize("op", sorted(SPECS))
def test_matches_float64_reference(op, device, request):
    """Values against the float64 reference within the op's tolerance; inputs untouched,
    outputs fresh, contiguous, of the input dtype and device."""
    runs_op(device, op)
    spec = SPECS[op]

    def body(data):
        drawn = spec.draw(HypothesisDrawer(data, device.limits))
        assume(device.supports(drawn) is None)
        note(f"sample: {drawn.describe()}")
        bk.check_sample(spec, device, drawn)

    run_examples(request, MSIM_EXAMPLES if device.name == "msim" else FUZZ_EXAMPLES, body)


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_other_cpu_kernel_builds_in_a_fresh_process(capability):
    """The kernels are compiled per CPU capability and the choice follows ATen's, once per
    process, so the portable and AVX2 builds (which an AVX512 machine never picks by itself)
    run in a child with ATEN_CPU_CAPABILITY set."""
    if capability != "default" and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    seeds = os.environ.get("METALCORE_SMOKE_SEEDS", "12")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "metalcore.testing.smoke",
            "--seeds",
            seeds,
            "--expect-capability",
            capability,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


# --- The checker must catch the classic kernel bugs: planted in a test-only namespace ----------

_selftest = torch.library.Library("metalcore_selftest", "DEF")
for _name in ("silu_tail", "silu_strides", "silu_writes_input", "silu_wrong_nan"):
    _selftest.define(f"{_name}(Tensor input) -> Tensor")


def _silu(x):
    return torch.nn.functional.silu(x.float()).to(x.dtype)


def _tail(x):  # leaves the last element unwritten (W4: uninitialised tails)
    out = torch.empty(x.shape, dtype=x.dtype)
    xc = x.contiguous().view(-1)
    out.view(-1)[:-1] = _silu(xc[:-1])
    return out


def _strides(x):  # reads the storage as if the view were contiguous (W1: ignores strides)
    raw = torch.as_strided(x, x.shape, torch.empty(x.shape).stride(), x.storage_offset())
    return _silu(raw).contiguous()


def _writes_input(x):  # scribbles on its input
    y = _silu(x).contiguous()
    if x.numel():
        try:
            x.add_(0.5)
        except RuntimeError:  # an expanded (self-overlapping) view cannot be written
            pass
    return y


def _wrong_nan(x):  # turns NaN into 0 (a kernel computing max(x, 0) and friends)
    return torch.nan_to_num(_silu(x), nan=0.0).contiguous()


for _name, _fn in (
    ("silu_tail", _tail),
    ("silu_strides", _strides),
    ("silu_writes_input", _writes_input),
    ("silu_wrong_nan", _wrong_nan),
):
    _selftest.impl(_name, _fn, "CPU")


@pytest.mark.parametrize(
    "planted", ["silu_tail", "silu_strides", "silu_writes_input", "silu_wrong_nan"]
)
def test_checker_catches_planted_bug(planted):
    spec = dataclasses.replace(SPECS["silu"], name=planted, namespace="metalcore_selftest")
    cpu = bk.backend("cpu")
    for seed in range(200):
        try:
            bk.check_sample(spec, cpu, sample(spec, seed))
        except bk.Mismatch:
            return
    pytest.fail(f"{planted}: 200 samples passed the checker")
