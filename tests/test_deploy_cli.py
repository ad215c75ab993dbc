"""`kquant fit --export` and `kquant export` write files that load and run in their runtime."""

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import kquant
from kquant import deploy
from kquant.cli import main


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """`kquant fit --save --export` once for the module: (folder, model)."""
    tmp_path = tmp_path_factory.mktemp("fit")
    out = CliRunner().invoke(main, [
        "fit", "--epochs", "1", "--quiet", "--quantizer", "bwn", "--input-quantizer", "sign",
        "--save", str(tmp_path / "m.keras"), "--export", str(tmp_path / "fit.npz")])
    assert out.exit_code == 0, out.output
    assert "exported" in out.output
    return tmp_path, keras.saving.load_model(tmp_path / "m.keras")


@pytest.mark.core
def test_fit_export_and_export_command_write_the_same_native_file(fitted):
    tmp_path, model = fitted
    out = CliRunner().invoke(main, ["export", str(tmp_path / "m.keras"), "-o",
                                    str(tmp_path / "cli.npz")])
    assert out.exit_code == 0, out.output
    x = kquant.datasets.load("digits")[1][0][:32]
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    for name in ("fit.npz", "cli.npz"):
        got = deploy.load_inference_model(tmp_path / name)(x, training=False)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), expected)


@pytest.mark.core
def test_export_command_rejects_bad_arguments(tmp_path):
    (tmp_path / "m.keras").write_bytes(b"not a model")
    out = CliRunner().invoke(main, ["export", str(tmp_path / "m.keras"), "-o", str(tmp_path / "x.bin")])
    assert out.exit_code != 0 and "--output" in out.output
    out = CliRunner().invoke(main, ["export", str(tmp_path / "m.keras"), "--format", "onnx",
                                    "-o", str(tmp_path / "x.npz")])
    assert out.exit_code != 0 and ".onnx" in out.output
    out = CliRunner().invoke(main, ["export", str(tmp_path / "m.keras"), "-o", str(tmp_path / "x.npz")])
    assert out.exit_code != 0 and "cannot load" in out.output


@pytest.mark.tf_only
def test_export_command_onnx_and_litert_run_in_their_runtimes(fitted):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("ai_edge_litert")
    from kquant.deploy import runtimes

    tmp_path, model = fitted
    x = kquant.datasets.load("digits")[1][0][:16]
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    for suffix, run in ((".onnx", lambda p: runtimes.run_onnx(p, x)),
                        (".tflite", lambda p: np.concatenate(
                            [runtimes.run_litert(p, x[i:i + 1]) for i in range(len(x))]))):
        path = tmp_path / f"m{suffix}"
        out = CliRunner().invoke(main, ["export", str(tmp_path / "m.keras"), "-o", str(path)])
        assert out.exit_code == 0, out.output
        got = run(path)
        assert np.abs(got - expected).max() <= 0.03 * np.abs(expected).max()
        assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.9
