"""Datasets: an embedded offline default, Keras' datasets, your own files.

``load(source)`` returns ``(x_train, y_train), (x_test, y_test)``: float32
images in [0, 1], channels last, and int32 labels. ``source`` is one of

* ``"digits"`` — scikit-learn's 8×8 handwritten digits (1,797 images shipped
  inside scikit-learn, no network; ``pip install 'kquant[digits]'``);
* ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"`` — through
  ``keras.datasets`` (every backend; cached under ``~/.keras/datasets`` or
  ``$KERAS_HOME``), or through tensorflow-datasets when ``data_dir`` is given
  (or ``source="tfds"``). Nothing is downloaded unless ``download=True``: a
  dataset that is not cached fails at once with :class:`DatasetUnavailable`
  saying how to get it;
* a ``.npz`` file with ``x_train, y_train, x_test, y_test`` (the layout of
  Keras' ``mnist.npz``) or ``x, y`` (split 75/25, deterministically);
* a folder of images with one sub-folder per class, read by
  ``keras.utils.image_dataset_from_directory`` (75/25 split; needs
  TensorFlow installed, whatever the Keras backend).
"""

from __future__ import annotations

import os

import numpy as np

KERAS_NAMES = ("mnist", "fashion_mnist", "cifar10")
TFDS_NAMES = KERAS_NAMES
NAMES = ("digits",) + KERAS_NAMES
NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10}

# What keras.datasets.<name>.load_data() finds in its cache (keras.utils.get_file).
_KERAS_CACHE = {
    "mnist": ["mnist.npz"],
    "fashion_mnist": [os.path.join("fashion-mnist", f) for f in (
        "train-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz")],
    "cifar10": ["cifar-10-batches-py-target_archive"],
}


class DatasetUnavailable(RuntimeError):
    """The dataset cannot be had (offline, not cached, not prepared, missing package)."""


def _split(x, y, test_fraction, seed):
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def load_digits(test_fraction=0.25, seed=0):
    """scikit-learn's 8×8 digits as (8, 8, 1) images, split deterministically."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:
        raise DatasetUnavailable(
            "The embedded dataset 'digits' is scikit-learn's: pip install 'kquant[digits]' "
            "(or 'kquant[datasets]')."
        ) from e
    data = sk_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    y = data.target.astype("int32")
    return _split(x, y, test_fraction, seed)


def _images(x):
    """float32 in [0, 1], channels last (a channel axis is added to grey images)."""
    x = np.asarray(x)
    scale = 255.0 if x.dtype == np.uint8 or (x.size and float(np.max(x)) > 1.0) else 1.0
    x = x.astype("float32") / scale
    return x[..., None] if x.ndim == 3 else x


def _labels(y):
    return np.asarray(y).reshape(-1).astype("int32")


def keras_cache_dirs():
    """Folders where ``keras.utils.get_file`` keeps downloaded datasets."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return [os.path.join(home, "datasets"), os.path.join("/tmp", ".keras", "datasets")]


def keras_cached(name) -> bool:
    """Whether ``keras.datasets.<name>.load_data()`` would find its files without downloading."""
    return any(all(os.path.exists(os.path.join(d, f)) for f in _KERAS_CACHE[name])
               for d in keras_cache_dirs())


def load_keras(name, download=False):
    """``mnist``/``fashion_mnist``/``cifar10`` through ``keras.datasets`` (any backend)."""
    if name not in KERAS_NAMES:
        raise ValueError(f"`name` must be one of {', '.join(KERAS_NAMES)}, got {name!r}.")
    if not download and not keras_cached(name):
        raise DatasetUnavailable(
            f"Dataset {name!r} is not in the Keras cache ({keras_cache_dirs()[0]}) and "
            "downloading is off. Download it once with kquant fit --dataset "
            f"{name} --download (datasets.load({name!r}, download=True)) on a machine with "
            "internet, give a tensorflow-datasets folder with --data-dir, or use the embedded "
            "default 'digits'."
        )
    import keras

    try:
        (x, y), (xt, yt) = getattr(keras.datasets, name).load_data()
    except Exception as e:
        raise DatasetUnavailable(f"Dataset {name!r}: keras.datasets failed: "
                                 f"{type(e).__name__}: {e}") from e
    return (_images(x), _labels(y)), (_images(xt), _labels(yt))


def _tfds_split(builder_name, split, data_dir, download):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DatasetUnavailable(
            f"Dataset {builder_name!r} from data_dir needs tensorflow-datasets: "
            "pip install 'kquant[tfds]' (or leave out --data-dir to use keras.datasets)."
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
    return _images(x), _labels(y)


def load_tfds(name, data_dir=None, download=False):
    """``mnist``/``fashion_mnist``/``cifar10`` through tensorflow-datasets (TensorFlow needed)."""
    return (_tfds_split(name, "train", data_dir, download),
            _tfds_split(name, "test", data_dir, download))


def load_npz(path, test_fraction=0.25, seed=0):
    """A ``.npz`` with ``x_train, y_train, x_test, y_test`` (or ``x, y``, split 75/25)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path!r} is not a readable .npz file: {e}") from e
    full = ("x_train", "y_train", "x_test", "y_test")
    if all(k in arrays for k in full):
        (x, y), (xt, yt) = (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])
    elif "x" in arrays and "y" in arrays:
        (x, y), (xt, yt) = _split(arrays["x"], arrays["y"], test_fraction, seed)
    else:
        raise ValueError(f"{path!r} must hold arrays {', '.join(full)} (or x, y); "
                         f"it holds {', '.join(sorted(arrays)) or 'nothing'}.")
    out = (_images(x), _labels(y)), (_images(xt), _labels(yt))
    for (xs, ys), split in zip(out, ("train", "test")):
        if xs.ndim != 4 or len(xs) != len(ys) or not len(xs):
            raise ValueError(f"{path!r}: {split} images must be (n, height, width[, channels]) with "
                             f"one label each; got {xs.shape} images and {ys.shape} labels.")
    return out


def load_image_folder(path, image_size=(32, 32), test_fraction=0.25, seed=0, color_mode="rgb"):
    """Images in ``path/<class>/*`` through ``keras.utils.image_dataset_from_directory``."""
    size = tuple(image_size)
    if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in size):
        raise ValueError(f"`image_size` must be two integers > 0 (height, width), got {image_size!r}.")
    try:
        import tensorflow  # noqa: F401  (image_dataset_from_directory builds a tf.data pipeline)
    except ImportError as e:
        raise DatasetUnavailable(
            f"Reading the image folder {path!r} needs TensorFlow (keras.utils."
            "image_dataset_from_directory uses tf.data): pip install 'kquant[tensorflow]'."
        ) from e
    import keras

    try:
        train, test = keras.utils.image_dataset_from_directory(
            path, validation_split=test_fraction, subset="both", seed=seed,
            image_size=size, color_mode=color_mode, batch_size=256,
            label_mode="int", verbose=False)
    except ValueError as e:
        raise ValueError(f"image folder {path!r}: {e}") from e

    def arrays(ds):
        parts = [(np.asarray(x), np.asarray(y)) for x, y in ds]
        if not parts:
            raise ValueError(f"image folder {path!r} has too few images for a "
                             f"{1 - test_fraction:.0%}/{test_fraction:.0%} split.")
        return (np.concatenate([p[0] for p in parts]).astype("float32") / 255.0,
                _labels(np.concatenate([p[1] for p in parts])))

    return arrays(train), arrays(test)


def check_source(source, param="dataset"):
    """Raise ``ValueError`` (naming ``param``) unless ``source`` is a known name, .npz or folder."""
    text = str(source)
    if text.lower() in NAMES:
        return
    if text.lower().endswith(".npz"):
        if not os.path.isfile(text):
            raise ValueError(f"`{param}`: file {text!r} does not exist.")
        return
    if os.path.isdir(text):
        return
    raise ValueError(f"`{param}` must be one of {', '.join(NAMES)}, a .npz file or a folder of "
                     f"images; got {text!r}.")


def load(name="digits", data_dir=None, download=False, source="auto", image_size=(32, 32)):
    """``(x_train, y_train), (x_test, y_test)`` for a name of :data:`NAMES`, a .npz or an image folder.

    ``source`` picks the loader of ``mnist``/``fashion_mnist``/``cifar10``:
    ``"keras"``, ``"tfds"`` or ``"auto"`` (tensorflow-datasets when
    ``data_dir`` is given, else ``keras.datasets``).
    """
    check_source(name, param="name")
    text = str(name)
    if text.lower() == "digits":
        return load_digits()
    if text.lower() in KERAS_NAMES:
        if source not in ("auto", "keras", "tfds"):
            raise ValueError(f"`source` must be 'auto', 'keras' or 'tfds', got {source!r}.")
        if source == "tfds" or (source == "auto" and data_dir is not None):
            return load_tfds(text.lower(), data_dir=data_dir, download=download)
        return load_keras(text.lower(), download=download)
    if text.lower().endswith(".npz"):
        return load_npz(text)
    return load_image_folder(text, image_size=image_size)
