import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from kquant.quantizers import registry as _quantizers  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=f"needs the TensorFlow backend (running {keras.backend.backend()})")
    for item in items:
        if "tf_only" in item.keywords and keras.backend.backend() != "tensorflow":
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    _quantizers.reload()  # the package may have been installed after kquant was first imported
    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield
