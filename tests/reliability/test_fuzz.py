"""Cross-backend fuzzing of every metalcore op against its float64 reference.

Every op registered in the dispatcher under ``metalcore::`` must have a spec in
``metalcore.testing.op_specs`` (so a new op without coverage fails here). For each op and each
backend (cpu always; msim, cuda and mps where present, otherwise skipped with the reason),
hypothesis draws shapes, dtypes, memory layouts, storage offsets and special values, and the
outputs must match the float64 reference within the op's per-dtype tolerance, with inputs left
untouched and outputs freshly written (allocations are NaN-poisoned while the op runs).

Example counts: ``METALCORE_FUZZ_EXAMPLES`` (default: 4x the hypothesis profile's max_examples,
40 per op and backend in CI); the ``long`` profile (METALCORE_HYPOTHESIS_PROFILE=long) is the
on-demand deep run. A failure prints the sample and a ``@reproduce_failure`` blob, and is kept in
the hypothesis example database, so the next run retries it first.
"""

import os
import subprocess
import sys

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

from metalcore.testing import backends as bk
from metalcore.testing.op_specs import SPECS, HypothesisDrawer, registered_ops

FUZZ_EXAMPLES = int(os.environ.get("METALCORE_FUZZ_EXAMPLES", 4 * settings.default.max_examples))


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


@pytest.mark.parametrize("backend", [b.name for b in bk.BACKENDS])
@pytest.mark.parametrize("op", sorted(SPECS))
@settings(max_examples=FUZZ_EXAMPLES)
@given(data=st.data())
def test_matches_float64_reference(op, backend, data):
    # Module-level @given under parametrize: hypothesis keys its example database by test id,
    # so a saved failure replays for the op and backend it came from.
    spec, be = SPECS[op], bk.backend(backend)
    why = be.op_unavailable(op)
    if why:
        pytest.skip(why)
    sample = spec.draw(HypothesisDrawer(data))
    note(f"sample: {sample.describe()}")
    bk.check_sample(spec, be, sample)


def test_portable_cpu_kernels_in_a_fresh_process():
    """The kernels are compiled per CPU capability and the choice is made once per process, so
    the portable (non-AVX2) variant runs in a child with ATEN_CPU_CAPABILITY=default."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    seeds = os.environ.get("METALCORE_SMOKE_SEEDS", "12")
    proc = subprocess.run(
        [sys.executable, "-m", "metalcore.testing.smoke", "--seeds", seeds, "--expect-default"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
