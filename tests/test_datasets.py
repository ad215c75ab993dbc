"""Dataset loaders: keras.datasets (mocked, offline), tensorflow-datasets (mock data),
a user's .npz and an image folder; offline failures are immediate and clear."""

import time

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from kquant import datasets


@pytest.fixture
def empty_keras_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setattr(datasets, "keras_cache_dirs", lambda: [str(tmp_path / "keras_home" / "datasets")])
    return tmp_path / "keras_home" / "datasets"


@pytest.mark.core
@pytest.mark.parametrize("name, shape, channels", [
    ("mnist", (28, 28), 1), ("fashion_mnist", (28, 28), 1), ("cifar10", (32, 32, 3), 3)])
def test_keras_datasets_mocked(name, shape, channels, empty_keras_cache, monkeypatch):
    rng = np.random.default_rng(0)
    labels_shape = (lambda n: (n, 1)) if name == "cifar10" else (lambda n: (n,))
    fake = ((rng.integers(0, 256, (20, *shape), dtype=np.uint8), rng.integers(0, 10, labels_shape(20))),
            (rng.integers(0, 256, (6, *shape), dtype=np.uint8), rng.integers(0, 10, labels_shape(6))))
    calls = []
    monkeypatch.setattr(getattr(keras.datasets, name), "load_data",
                        lambda: calls.append(name) or fake)
    monkeypatch.setattr(datasets, "keras_cached", lambda n: n == name)  # "in the cache"
    (x, y), (xt, yt) = datasets.load(name)
    assert calls == [name]
    assert x.shape == (20, *shape[:2], channels) and xt.shape == (6, *shape[:2], channels)
    assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    np.testing.assert_allclose(x.reshape(20, -1), fake[0][0].reshape(20, -1) / 255.0, rtol=1e-6)
    assert y.dtype == np.int32 and y.shape == (20,) and np.array_equal(y, fake[0][1].ravel())


@pytest.mark.core
def test_keras_dataset_not_cached_fails_at_once_without_downloading(empty_keras_cache, monkeypatch):
    monkeypatch.setattr(keras.datasets.mnist, "load_data",
                        lambda: pytest.fail("must not try to download"))
    t0 = time.perf_counter()
    with pytest.raises(datasets.DatasetUnavailable, match=r"not in the Keras cache.*--download"):
        datasets.load("mnist")
    assert time.perf_counter() - t0 < 1.0
    assert not datasets.keras_cached("cifar10")
    (empty_keras_cache).mkdir(parents=True)
    (empty_keras_cache / "mnist.npz").write_bytes(b"")
    assert datasets.keras_cached("mnist")


@pytest.mark.core
def test_keras_download_failure_is_reported_clearly(empty_keras_cache, monkeypatch):
    def offline():
        raise Exception("URL fetch failure on https://example: no network")
    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)
    with pytest.raises(datasets.DatasetUnavailable, match="fashion_mnist.*URL fetch failure"):
        datasets.load("fashion_mnist", download=True)


@pytest.mark.core
def test_npz_with_train_and_test_arrays(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=rng.integers(0, 256, (30, 10, 12), dtype=np.uint8),
             y_train=rng.integers(0, 3, 30), x_test=rng.integers(0, 256, (9, 10, 12), dtype=np.uint8),
             y_test=rng.integers(0, 3, 9))
    (x, y), (xt, yt) = datasets.load(str(path))
    assert x.shape == (30, 10, 12, 1) and xt.shape == (9, 10, 12, 1) and x.max() <= 1.0
    assert y.dtype == np.int32 and len(yt) == 9


@pytest.mark.core
def test_npz_with_x_and_y_is_split_deterministically(tmp_path):
    path = tmp_path / "xy.npz"
    x = np.random.default_rng(0).random((40, 6, 6, 2)).astype("float32")
    np.savez(path, x=x, y=np.arange(40) % 4)
    (a, ya), (b, yb) = datasets.load(str(path))
    assert len(a) == 30 and len(b) == 10 and a.shape[1:] == (6, 6, 2)
    np.testing.assert_array_equal(a, datasets.load(str(path))[0][0])
    assert sorted(np.concatenate([ya, yb]).tolist()) == sorted((np.arange(40) % 4).tolist())
    np.testing.assert_allclose(np.sort(np.concatenate([a, b]).ravel()), np.sort(x.ravel()))


@pytest.mark.core
def test_bad_npz_names_the_file_and_what_is_missing(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match=r"bad.npz.*x_train, y_train, x_test, y_test.*holds images"):
        datasets.load(str(path))
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="junk.npz.*not a readable .npz"):
        datasets.load(str(tmp_path / "junk.npz"))
    with pytest.raises(ValueError, match="does not exist"):
        datasets.load(str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="`name` must be one of digits"):
        datasets.load("imagenet")


def test_image_folder(tmp_path):
    pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "eel"):
        (tmp_path / cls).mkdir()
        for i in range(8):
            img = rng.integers(0, 256, (20, 16, 3)).astype("uint8")
            keras.utils.save_img(str(tmp_path / cls / f"{i}.png"), img)
    (x, y), (xt, yt) = datasets.load(str(tmp_path), image_size=(12, 12))
    assert len(x) + len(xt) == 24 and len(xt) == 6
    assert x.shape[1:] == (12, 12, 3) and x.dtype == np.float32 and 0 <= x.min() <= x.max() <= 1
    assert set(np.concatenate([y, yt]).tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="`image_size` must be two integers > 0"):
        datasets.load(str(tmp_path), image_size=(0, 12))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="image folder .*empty"):
        datasets.load(str(tmp_path / "empty"))


@pytest.mark.tf_only  # the CLI path is the same on every backend; the loaders are not
def test_cli_fit_trains_on_a_users_npz(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 96)
    x = rng.random((96, 8, 8)).astype("float32") * 0.2 + y[:, None, None] * 0.8
    np.savez(tmp_path / "two_classes.npz", x=x, y=y)
    out = CliRunner().invoke(__import__("kquant.cli").cli.main, [
        "fit", "--dataset", str(tmp_path / "two_classes.npz"), "--epochs", "1", "--quiet", "--json"])
    assert out.exit_code == 0, out.output
    import json

    data = json.loads(out.stdout)
    assert data["summary"]["layers"][-1]["kernel_params"] % 2 == 0  # a 2-class head
    assert 0 <= data["test_accuracy"] <= 1


def test_tfds_loader_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        (x, y), (xt, yt) = datasets.load("mnist", source="tfds")
    assert x.shape == (12, 28, 28, 1) and x.dtype == np.float32 and x.max() <= 1.0
    assert y.dtype == np.int32 and xt.shape[0] == 12


@pytest.mark.core
def test_missing_scikit_learn_gives_the_extra_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails
    with pytest.raises(datasets.DatasetUnavailable, match=r"kquant\[digits\]"):
        datasets.load("digits")
