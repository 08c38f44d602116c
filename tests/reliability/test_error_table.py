"""docs/errors.md, generated from the bad-input cases of the specs, is current. (That every op
raises each case's exception and message, on every device, is the op contract's
test_bad_input in tests/ops/test_contract.py.)"""

from metalcore.testing import error_table
from tests.support import REPO


def test_errors_doc_is_current():
    doc = REPO / "docs" / "errors.md"
    expected = error_table.render()
    assert doc.is_file() and doc.read_text() == expected, (
        "docs/errors.md is stale: regenerate it with "
        "`python -m metalcore.testing.error_table > docs/errors.md`"
    )
