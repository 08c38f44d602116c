"""Bad input: every op rejects each bad-input case of its spec with the expected exception type
and message, and docs/errors.md (generated from these cases) is current."""

import re

import pytest

from metalcore.testing import error_table
from metalcore.testing.op_specs import SPECS
from tests.support import REPO

CASES = [(name, i) for name in sorted(SPECS) for i in range(len(SPECS[name].bad_inputs))]


@pytest.mark.parametrize(
    "op,case", CASES, ids=[f"{n}-{SPECS[n].bad_inputs[i].description}" for n, i in CASES]
)
def test_bad_input_raises_documented_error(op, case):
    spec = SPECS[op]
    if not error_table.has_cpu_kernel(op):
        pytest.skip(f"metalcore::{op} has no CPU kernel")
    bad = spec.bad_inputs[case]
    err = error_table.run_case(spec, bad)
    assert err is not None, f"metalcore.{op} accepted {bad.description}"
    assert type(err) is bad.error, f"{type(err).__name__}: {err}"
    assert re.search(bad.match, str(err)), f"message {str(err)!r} does not match {bad.match!r}"


def test_errors_doc_is_current():
    doc = REPO / "docs" / "errors.md"
    expected = error_table.render()
    assert doc.is_file() and doc.read_text() == expected, (
        "docs/errors.md is stale: regenerate it with "
        "`python -m metalcore.testing.error_table > docs/errors.md`"
    )
