import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import metalcore  # noqa: F401  (registers the ops)
from tests.metal.coverage import pytest_configure, pytest_sessionfinish  # noqa: F401  (msim gate)

# Hypothesis profiles: "ci" keeps the suite within its time budget on 2 cores; "long" is the
# on-demand fuzz profile (METALCORE_HYPOTHESIS_PROFILE=long).
settings.register_profile(
    "ci",
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
    print_blob=True,
)
settings.register_profile("long", parent=settings.get_profile("ci"), max_examples=300)
settings.load_profile(os.environ.get("METALCORE_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _reset_dynamo():
    yield
    torch._dynamo.reset()
