import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from kquant.estimators import registry as _estimators  # noqa: E402
from kquant.quantizers import registry as _quantizers  # noqa: E402
from kquant.testing import fresh_state, pytest_collection_modifyitems  # noqa: E402, F401 (a pytest hook)


@pytest.fixture(autouse=True)
def _seed():
    fresh_state(_estimators, _quantizers)
    yield
