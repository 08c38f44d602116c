"""Determinism: on CPU the same inputs give bitwise-identical outputs call after call, and for
any torch.set_num_threads (see docs/reliability.md for the per-backend statement)."""

import pytest
import torch

from metalcore.testing import backends as bk
from metalcore.testing.op_specs import SPECS, typical_samples
from tests.reliability.test_threads import _same


def _outputs(spec, sample):
    args, kwargs = sample.materialize("cpu")
    outs = spec.outputs(args, bk.backend("cpu").call(spec, args, kwargs))
    return [t.clone() for t in outs]


@pytest.mark.parametrize("op", sorted(SPECS))
def test_repeated_calls_are_bitwise_identical(op):
    spec = SPECS[op]
    why = bk.backend("cpu").op_unavailable(op)
    if why:
        pytest.skip(why)
    for s in typical_samples(spec, 3, lo=1000, hi=300_000):
        first = _outputs(spec, s)
        for _ in range(3):
            assert _same(first, _outputs(spec, s)), f"metalcore.{op}: {s.describe()}"


@pytest.mark.parametrize("op", sorted(SPECS))
def test_results_do_not_depend_on_thread_count(op):
    spec = SPECS[op]
    why = bk.backend("cpu").op_unavailable(op)
    if why:
        pytest.skip(why)
    # Large enough that the kernels split the work across tasks (32K-element grain).
    samples = typical_samples(spec, 2, lo=60_000, hi=400_000)
    prev = torch.get_num_threads()
    try:
        results = {}
        for n in sorted({1, 2, 3, max(prev, 1)}):
            torch.set_num_threads(n)
            results[n] = [_outputs(spec, s) for s in samples]
    finally:
        torch.set_num_threads(prev)
    base = results[1]
    for n, outs in results.items():
        for s, a, b in zip(samples, base, outs):
            assert _same(a, b), f"metalcore.{op}: {n} threads differ from 1 for {s.describe()}"
