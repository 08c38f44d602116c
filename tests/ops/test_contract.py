"""The op contract: every op of ``metalcore.testing.op_specs.SPECS`` on every device.

One engine for all ops: each test takes an op's spec (inputs, float64 reference, tolerances,
autograd mapping, edge cases, bad inputs) and the ``device`` fixture (cpu, msim, cuda, mps; see
tests/conftest.py) and knows no op by name, so a new op is covered by its spec alone. Its
numerics against the float64 reference are tests/reliability/test_fuzz.py's
``test_matches_float64_reference`` (the fuzzer, which the sanitizer job also runs); the other
checks are below, implemented in ``metalcore.testing.engine``. Per-family files keep only what
is specific to a family (Hugging Face formulations, torch.optim equivalence, kernel variants).

Examples per test follow the hypothesis profile (``METALCORE_HYPOTHESIS_PROFILE``). Tensor
values come from drawn seeds, so a failure prints its sample, replays from the example database
and shrinks.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import assume, note, settings
from hypothesis import strategies as st

from metalcore.testing import backends as bk
from metalcore.testing import engine
from metalcore.testing.op_specs import SPECS, HypothesisDrawer, RandomDrawer, numel
from tests.support import run_examples, runs_op

OPS = sorted(SPECS)
DIFFERENTIABLE = sorted(name for name, spec in SPECS.items() if spec.gradient is not None)
EXAMPLES = settings.default.max_examples
# A compile costs about a second: one case (three sizes) per op and device in CI.
COMPILE_EXAMPLES = max(1, EXAMPLES // 10)
BAD_INPUTS = [(name, i) for name in OPS for i in range(len(SPECS[name].bad_inputs))]


def _traceable(device: bk.Backend, what: str) -> None:
    if not device.traceable:
        pytest.skip(
            f"{device.name}'s test ops are plain CPU kernels without autograd or fakes: {what} "
            "runs on the real dispatch keys; the backward ops are fuzzed directly"
        )


@pytest.mark.parametrize("op", OPS)
def test_edge_cases(op, device):
    """The spec's fixed cases (empty shapes, NaN and Inf rows, ...) on every device."""
    runs_op(device, op)
    spec = SPECS[op]
    cases = [s for s in spec.edges() if device.supports(s) is None]
    assert cases or not spec.edges(), f"{op}: no edge case runs on {device.name}"
    for sample in cases:
        bk.check_sample(spec, device, sample)


@pytest.mark.parametrize("op", DIFFERENTIABLE)
def test_gradients(op, device, request):
    """Autograd through the op gives its backward op's results bit for bit, within the
    tolerance of the backward's float64 reference."""
    runs_op(device, op)
    _traceable(device, "autograd")
    spec = SPECS[op]

    def body(data):
        d = HypothesisDrawer(data, device.limits)
        sample = spec.draw(d)
        assume(device.supports(sample) is None)
        grad_outputs = engine.draw_grad_outputs(d, spec, sample)
        note(f"sample: {sample.describe()}")
        engine.check_gradients(spec, device, sample, grad_outputs)

    run_examples(request, EXAMPLES, body)


@pytest.mark.parametrize("op", DIFFERENTIABLE)
def test_gradcheck_float64(op, request):
    """Numerical against analytical gradients in float64 on the CPU, all outputs together and
    each alone (small samples, no special values)."""
    spec = SPECS[op]

    def body(data):
        sample = spec.draw(HypothesisDrawer(data, engine.GRADCHECK_LIMITS))
        note(f"sample: {sample.describe()}")
        engine.check_gradcheck(spec, sample)

    run_examples(request, EXAMPLES, body)


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, device, request):
    """torch.library.opcheck: schema, autograd registration, fake tensors, AOT dispatch with
    dynamic shapes; with and without inputs requiring grad."""
    runs_op(device, op)
    _traceable(device, "opcheck")
    spec = SPECS[op]
    # opcheck compares outputs with assert_close (NaN != NaN), and its stride-preserving copy of
    # the inputs fails on empty views (torch 2.13: "negative dimension -1"). It checks the
    # registration, not the values: small tensors keep its ten runs of the op cheap.
    limits = dataclasses.replace(device.limits, specials=False, min_size=1, max_size=9)

    def body(data):
        d = HypothesisDrawer(data, limits)
        sample = spec.draw(d)
        assume(device.supports(sample) is None)
        # Finite inputs can still give NaN outputs (a failed Cholesky's factor), which opcheck's
        # comparisons call different from themselves: those samples are the other checks'.
        outs = bk.run_sample(spec, device, sample)
        assume(not any(o.is_floating_point() and o.isnan().any() for o in outs))
        requires_grad = spec.gradient is not None and d.boolean(label="requires_grad")
        note(f"sample: {sample.describe()}, requires_grad={requires_grad}")
        engine.check_opcheck(spec, device, sample, requires_grad)

    run_examples(request, EXAMPLES, body)


@pytest.mark.parametrize("op", OPS)
def test_compile(op, device, request):
    """torch.compile(fullgraph=True, dynamic=True) at three sizes of one drawn case under
    fail_on_recompile: eager's outputs and, through the compiled backward, eager's gradients."""
    runs_op(device, op)
    _traceable(device, "compile")
    spec = SPECS[op]

    def body(data):
        d = RandomDrawer(data.draw(st.integers(0, 2**31 - 1), label="seed"), device.limits)
        samples = engine.draw_sized_samples(spec, d)
        assume(all(device.supports(s) is None for s in samples))
        grads = None
        if spec.gradient is not None:
            grads = [engine.draw_grad_outputs(d, spec, s) for s in samples]
        note("samples: " + " | ".join(s.describe() for s in samples))
        engine.check_compile(spec, device, samples, grads)

    run_examples(request, COMPILE_EXAMPLES, body)


@pytest.fixture(scope="session")
def exported(device, tmp_path_factory):
    """Every op exported on ``device`` and run in one fresh process (one per device and
    session keeps the interpreter start-ups out of the per-op cost)."""
    _traceable(device, "export")
    limits = dataclasses.replace(device.limits, layouts=engine.EXPORT_LAYOUTS)
    cases = {}
    for op in OPS:
        if device.op_unavailable(op) is None:
            # The first seed with tensors to export (adamw may draw empty lists).
            for seed in range(100):
                samples = engine.draw_sized_samples(SPECS[op], RandomDrawer(seed, limits), 2)
                if numel(samples[0]) and all(device.supports(s) is None for s in samples):
                    cases[op] = tuple(samples)
                    break
    folder = tmp_path_factory.mktemp(f"export-{device.name}")
    results = engine.export_programs(cases, device, folder)
    ok = [op for op, r in results.items() if not isinstance(r, Exception)]
    engine.run_exported_in_fresh_process(folder, ok)
    return folder, results


@pytest.mark.parametrize("op", OPS)
def test_export(op, device, exported):
    """torch.export with every dim dynamic keeps the op through run_decompositions(), and the
    saved program gives eager's results on inputs of other sizes in a fresh process."""
    runs_op(device, op)
    folder, results = exported
    engine.check_exported(op, device, results[op], folder)


@pytest.mark.parametrize(
    "op,case", BAD_INPUTS, ids=[f"{n}-{SPECS[n].bad_inputs[i].description}" for n, i in BAD_INPUTS]
)
def test_bad_input(op, case, device):
    """Each bad input of the spec raises its exception type and message (off the CPU: the CPU's
    exact message; one set of checks serves every backend)."""
    runs_op(device, op)
    spec = SPECS[op]
    bad = spec.bad_inputs[case]
    reason = engine.bad_input_skip(spec, device, bad) or engine.check_bad_input(spec, device, bad)
    if reason:
        pytest.skip(reason)
