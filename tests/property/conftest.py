"""Hypothesis profiles for the property layer.

``ci`` (the default) is small and derandomized so that CI is reproducible and bounded; ``dev`` explores
more (``HYPOTHESIS_PROFILE=dev``). Neither writes an example database into the checkout.
"""

import os
import tempfile

import pytest
from hypothesis import HealthCheck, Phase, settings

_COMMON = {
    "deadline": None,
    "database": None,
    "print_blob": True,
    # tensors are built inside the tests from a drawn seed; the autouse seeding fixture of tests/conftest.py
    # is function scoped, which is harmless here
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
}
# failing runs make hypothesis save patch files: keep them (and any database) out of the checkout
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "fastgen-hypothesis")
)
# ci: no shrinking (a derandomized failure reproduces as it is; shrink it with the dev profile)
settings.register_profile(
    "ci", max_examples=12, derandomize=True, phases=[Phase.explicit, Phase.reuse, Phase.generate], **_COMMON
)
settings.register_profile("dev", max_examples=150, derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.property)
