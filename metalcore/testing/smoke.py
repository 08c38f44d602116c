"""Seeded smoke of every op on every available backend, without pytest or hypothesis.

``python -m metalcore.testing.smoke --seeds 20`` checks 20 reproducible samples per op and backend
against the float64 reference (see :func:`metalcore.testing.backends.check_sample`), then runs each
differentiable op forward and backward through autograd and every bad-input case. It exits
non-zero on the first failure and prints the op, backend, seed and sample, so
``--op NAME --seed N`` reruns exactly that case. The sanitizer job runs it against the
instrumented library, once per CPU capability.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import metalcore  # noqa: F401  (loads the library named by METALCORE_LIBRARY, if set)

from . import backends as bk
from .op_specs import SPECS, registered_ops, sample


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=20, help="samples per op and backend")
    p.add_argument("--seed", type=int, default=None, help="run only this seed")
    p.add_argument("--op", action="append", help="only these ops (repeatable)")
    p.add_argument(
        "--expect-capability",
        help="fail unless torch (and so metalcore's CPU dispatch) runs this CPU capability, "
        "e.g. DEFAULT or AVX2 (set with ATEN_CPU_CAPABILITY)",
    )
    a = p.parse_args(argv)

    cap = torch.backends.cpu.get_cpu_capability()
    print(f"metalcore smoke: library {metalcore._library.load()}, CPU capability {cap}")
    if a.expect_capability and cap != a.expect_capability.upper():
        print(f"expected the {a.expect_capability.upper()} CPU capability, got {cap}")
        return 2
    missing = registered_ops() - SPECS.keys()
    if missing and not a.op:
        print(f"FAIL: ops without a spec: {sorted(missing)}")
        return 1

    seeds = [a.seed] if a.seed is not None else list(range(a.seeds))
    names = a.op or sorted(SPECS)
    t0 = time.perf_counter()
    checked = 0
    for name in names:
        spec = SPECS[name]
        for be in bk.BACKENDS:
            why = be.op_unavailable(name)
            if why:
                print(f"skip {name} on {be.name}: {why}")
                continue
            for seed in seeds:
                s = sample(spec, seed)
                if be.supports(s) is not None:
                    continue
                try:
                    bk.check_sample(spec, be, s)
                except Exception as e:
                    print(f"FAIL {name} on {be.name}, seed {seed}: {s.describe()}\n{e}")
                    print(f"rerun: python -m metalcore.testing.smoke --op {name} --seed {seed}")
                    return 1
                checked += 1
        if bk.backend("cpu").op_unavailable(name):
            continue
        if spec.autograd is not None:
            for seed in seeds[:3]:
                args, kwargs = sample(spec, seed).materialize("cpu")
                spec.autograd(args, kwargs)
        for bad in spec.bad_inputs:
            args, kwargs = bad.make()
            try:
                spec.overload()(*args, **kwargs)
            except bad.error:
                pass
            else:
                print(f"FAIL {name}: {bad.description} was accepted")
                return 1
    print(f"ok: {checked} samples in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
