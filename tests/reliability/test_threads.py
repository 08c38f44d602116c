"""Threads: ops called concurrently from several Python threads (on shared inputs) give bitwise
the same results as serial calls, and nothing crashes."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from metalcore.testing import backends as bk
from metalcore.testing.op_specs import SPECS, typical_samples

THREADS = 4
ROUNDS = 6


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    width = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.view(width)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b)
    )


def concurrent_matches_serial(run, n_inputs: int) -> list[str]:
    """Runs ``run(i)`` serially for each input, then from THREADS threads at once, ROUNDS
    times each; returns descriptions of the results that differ from the serial ones."""
    serial = [[t.clone() for t in run(i)] for i in range(n_inputs)]
    jobs = [i % n_inputs for i in range(THREADS * ROUNDS)]
    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(run, jobs))
    return [f"input {i}" for i, r in zip(jobs, results) if not _same(serial[i], r)]


def test_detector_catches_shared_scratch_state():
    # A kernel that keeps its scratch buffer in shared state races under threads.
    scratch = torch.empty(50_000)
    xs = [torch.full((50_000,), float(i)) for i in range(3)]

    def racy(i):
        scratch.copy_(xs[i])
        for _ in range(20):
            scratch.mul_(1.0)  # widens the window between write and read
        return [scratch.clone()]

    assert concurrent_matches_serial(racy, 3), "the racy function was not caught"


@pytest.mark.parametrize("op", sorted(SPECS))
def test_concurrent_calls_match_serial(op):
    spec, be = SPECS[op], bk.backend("cpu")
    why = be.op_unavailable(op)
    if why:
        pytest.skip(why)
    samples = typical_samples(spec, 3, lo=1000, hi=200_000)
    inputs = [s.materialize("cpu") for s in samples]

    def run(i):
        args, kwargs = inputs[i]
        if spec.mutated_args:  # in-place ops get fresh copies of their mutated inputs
            args, kwargs = samples[i].materialize("cpu")
        outs = spec.outputs(args, be.call(spec, args, kwargs))
        if spec.autograd is not None:
            outs = list(outs) + [g for g in spec.autograd(args, kwargs) if g is not None]
        return outs

    bad = concurrent_matches_serial(run, len(inputs))
    assert not bad, f"metalcore.{op}: concurrent results differ from serial for {bad}"
