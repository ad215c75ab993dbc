"""Datasets: an embedded offline default and tensorflow-datasets loaders.

``load("digits")`` is scikit-learn's 8×8 handwritten digits (1,797 images,
shipped inside the package, no network). ``mnist``, ``fashion_mnist`` and
``cifar10`` come through ``tensorflow-datasets`` from ``data_dir`` and are
never downloaded unless ``download=True``: a missing dataset fails at once
with :class:`DatasetUnavailable` saying how to get it.

All loaders return ``(x_train, y_train), (x_test, y_test)``: float32 images
in [0, 1], channels last, and int32 labels.
"""

from __future__ import annotations

import numpy as np

TFDS_NAMES = ("mnist", "fashion_mnist", "cifar10")
NAMES = ("digits",) + TFDS_NAMES
NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10}


class DatasetUnavailable(RuntimeError):
    """The dataset cannot be had (offline, not prepared in ``data_dir``)."""


def load_digits(test_fraction=0.25, seed=0):
    """scikit-learn's 8×8 digits as (8, 8, 1) images, split deterministically."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    y = data.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def _tfds_split(builder_name, split, data_dir, download):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DatasetUnavailable(
            f"Dataset {builder_name!r} needs tensorflow-datasets: pip install 'kquant[datasets]'."
        ) from e
    try:
        ds = tfds.load(builder_name, split=split, data_dir=data_dir, download=download,
                       as_supervised=True)
        # batches, not batch_size=-1 (which aborts TF 2.21 under tfds' mock data)
        parts = list(tfds.as_numpy(ds.batch(4096)))
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
    except Exception as e:  # tfds raises several types for "not prepared"
        raise DatasetUnavailable(
            f"Dataset {builder_name!r} ({split}) is not available in data_dir={data_dir!r} and "
            f"downloading is {'on' if download else 'off'}: {type(e).__name__}: {e}. "
            "Prepare it on a machine with internet (tfds build / tfds.load with download=True) "
            "and pass its folder with --data-dir, or use the embedded default 'digits'."
        ) from e
    return (np.asarray(x, "float32") / 255.0), np.asarray(y, "int32")


def load(name="digits", data_dir=None, download=False):
    """``(x_train, y_train), (x_test, y_test)`` for one of :data:`NAMES`."""
    name = str(name).lower()
    if name == "digits":
        return load_digits()
    if name not in TFDS_NAMES:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {', '.join(NAMES)}.")
    return (_tfds_split(name, "train", data_dir, download),
            _tfds_split(name, "test", data_dir, download))
