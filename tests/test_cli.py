"""The command line as a user meets it: readable output in a file, validation before
training, no lost work, JSON for machines, lazy imports."""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import kquant
from kquant import cli, training
from kquant.cli import main

ANSI = re.compile(r"\x1b\[")


def _tiny_result(*_, **__):
    """A stand-in for training.fit: a tiny trained-looking quantized model, instantly."""
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              kquant.QuantDense(10, kernel_quantizer="bwn")])
    return training.FitResult(model, {"loss": [1.0], "flip_ratio": [0.1]}, 0.5, 1.0)


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if training starts (checks that must happen before it)."""
    def boom(*a, **k):
        raise AssertionError("training started")
    monkeypatch.setattr(training, "fit", boom)


@pytest.mark.core
@pytest.mark.parametrize("args, hint, message", [
    (["--save", "model"], "--save", "must end with .keras"),
    (["--save", "model.h5"], "--save", "must end with .keras"),
    (["--save", "model.KERAS"], "--save", "must end with .keras"),
    (["--save", "no/such/dir/m.keras"], "--save", "does not exist"),
    (["--export", "w.txt"], "--export", "must end with .npz"),
    (["--export", "no/such/dir/w.npz"], "--export", "does not exist"),
    (["--lr", "nan"], "--lr", "finite number > 0"),
    (["--lr", "inf"], "--lr", "finite number > 0"),
    (["--lr", "-1"], "--lr", "finite number > 0"),
    (["--lr", "0"], "--lr", "finite number > 0"),
    (["--lr", "fast"], "--lr", "not a number"),
    (["--epochs", "0"], "--epochs", "0"),
    (["--bits", "0"], "--bits", "0"),
    (["--dataset", "nope.npz"], "--dataset", "does not exist"),
    (["--dataset", "imagenet"], "--dataset", "digits"),
    (["--jit-compile", "yes"], "--jit-compile", "'auto', 'on', 'off'"),
])
def test_fit_rejects_bad_paths_and_numbers_before_training(args, hint, message, no_training,
                                                          tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(main, ["fit", *args])
    assert out.exit_code == 2, out.output
    assert hint in out.output and message in out.output
    assert "Traceback" not in out.output


@pytest.mark.core
def test_save_path_that_is_a_folder_fails_before_training(no_training, tmp_path):
    (tmp_path / "m.keras").mkdir()
    out = CliRunner().invoke(main, ["fit", "--save", str(tmp_path / "m.keras")])
    assert out.exit_code == 2 and "--save" in out.output and "is a directory" in out.output


@pytest.mark.core
def test_training_function_validates_the_learning_rate():
    for bad in (float("nan"), -1.0, 0.0, float("inf"), "x"):
        with pytest.raises(ValueError, match="`learning_rate` must be a finite number > 0"):
            training.fit(learning_rate=bad, epochs=1)


@pytest.mark.core
def test_a_failure_after_training_saves_to_a_named_fallback(tmp_path, monkeypatch):
    target = tmp_path / "gone"
    target.mkdir()

    def fit_then_folder_vanishes(**kwargs):
        target.rmdir()  # the folder disappears while training runs
        return _tiny_result()

    monkeypatch.setattr(training, "fit", fit_then_folder_vanishes)
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(main, ["fit", "--save", str(target / "m.keras")])
    assert out.exit_code == 1, out.output
    saved = re.search(r"saved to '([^']+\.keras)' instead", out.output.replace("\n", ""))
    assert saved, out.output
    assert os.path.dirname(saved.group(1)) == str(tmp_path)
    reloaded = keras.saving.load_model(saved.group(1))
    assert [w.shape for w in reloaded.weights] == [w.shape for w in _tiny_result().model.weights]


@pytest.mark.core
@pytest.mark.parametrize("flag, expected", [([], "auto"), (["--jit-compile", "on"], True),
                                            (["--jit-compile", "off"], False)])
def test_fit_passes_jit_compile_to_training(flag, expected, monkeypatch):
    seen = {}

    def fit(**kwargs):
        seen.update(kwargs)
        return _tiny_result()

    monkeypatch.setattr(training, "fit", fit)
    out = CliRunner().invoke(main, ["fit", "--quiet", *flag])
    assert out.exit_code == 0, out.output
    assert seen["jit_compile"] is expected if isinstance(expected, bool) else seen["jit_compile"] == expected


@pytest.mark.core
def test_fit_json_is_the_only_thing_on_stdout(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "fit", _tiny_result)
    out = CliRunner().invoke(main, ["fit", "--json", "--save", str(tmp_path / "m.keras"),
                                    "--export", str(tmp_path / "w.npz")])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["test_accuracy"] == 0.5 and data["history"]["flip_ratio"] == [0.1]
    assert data["jit_compile"] is bool(_tiny_result().model.jit_compile)
    assert data["saved"].endswith("m.keras") and data["exported"].endswith("w.npz")
    assert data["summary"]["total_params"] == 650 and data["summary"]["layers"][0]["kernel_bits"] == 1
    assert (tmp_path / "m.keras").is_file() and (tmp_path / "w.npz").is_file()


@pytest.mark.core
def test_summary_command_prints_every_number_whole_and_as_json(tmp_path):
    model = keras.Sequential([keras.Input((64, 64, 3)),
                              kquant.QuantConv2D(96, 3, kernel_quantizer="sign"),
                              keras.layers.Flatten(),
                              kquant.QuantDense(10, kernel_quantizer="bwn", input_quantizer="sign")])
    path = str(tmp_path / "wide_model_with_a_long_name.keras")
    model.save(path)
    out = CliRunner().invoke(main, ["summary", path])  # stdout is not a TTY here
    assert out.exit_code == 0, out.output
    assert not ANSI.search(out.output) and "…" not in out.output
    info = kquant.summary(model, print_summary=False)
    for header in ("weight bits", "input bits", "memory (KiB)", "compression", "precision"):
        assert header in out.output
    for s in info.layers:
        assert f"{s.macs:,}" in out.output and f"{s.kernel_params + s.float_params:,}" in out.output
    assert f"{sum(s.macs for s in info.layers):,}" in out.output  # 8-digit total, not cut
    data = json.loads(CliRunner().invoke(main, ["summary", path, "--json"]).stdout)
    assert data["macs"] == sum(s.macs for s in info.layers) > 10_000_000
    assert [layer["name"] for layer in data["layers"]] == [s.name for s in info.layers]


@pytest.mark.core
def test_summary_table_folds_instead_of_cutting_on_a_narrow_terminal():
    from rich.console import Console

    model = keras.Sequential([keras.Input((64, 64, 3)),
                              kquant.QuantConv2D(96, 3, kernel_quantizer="sign")])
    console = Console(record=True, width=60, force_terminal=True, color_system=None,
                      file=open(os.devnull, "w"))
    kquant.summary(model, console=console)
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 60
    lines = text.splitlines()
    body = lines[next(i for i, x in enumerate(lines) if x.startswith("┡")) + 1:
                 next(i for i, x in enumerate(lines) if x.startswith("├"))]
    macs_cell = "".join(line.split("│")[8].strip() for line in body)  # the folded cell, rejoined
    assert macs_cell == f"{kquant.summary(model, print_summary=False).layers[0].macs:,}"


@pytest.mark.core
def test_progress_bars_only_on_a_tty(monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert cli.progress_verbose() == 1
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert cli.progress_verbose() == 2
    assert cli.progress_verbose(quiet=True) == 0


@pytest.mark.tf_only  # output and logging paths are backend-independent; TF pass only
def test_real_fit_into_a_file_has_no_control_characters(tmp_path):
    """``kquant fit > log.txt``: one line per epoch, no \\r/\\b/ANSI, the summary whole."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "COLUMNS": "80"}
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "kquant.cli", "fit", "--epochs", "2",
                               "--batch-size", "256", "--save", "m.keras"], cwd=tmp_path, stdout=log,
                              stderr=subprocess.PIPE, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "log.txt").read_text()
    assert "\r" not in text and "\b" not in text and not ANSI.search(text)
    assert "Epoch 2/2" in text and len([l for l in text.splitlines() if "val_loss" in l]) == 2
    assert max(len(line) for line in text.splitlines()) < 400
    assert "test accuracy:" in text and "saved m.keras" in text and "…" not in text
    info = kquant.summary(keras.saving.load_model(tmp_path / "m.keras"), print_summary=False)
    for s in info.layers:
        assert f"{s.macs:,}" in text and s.name in text
    assert "compression" in text and f"{sum(s.macs for s in info.layers):,}" in text


def test_help_imports_neither_keras_nor_a_backend():
    # argv[0] is what the ``kquant`` console script has: only it skips registering
    # kquant's Keras classes at ``import kquant``.
    code = ("import sys; sys.argv[0] = 'kquant'; from click.testing import CliRunner; "
            "from kquant.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_python_m_kquant_cli_help_imports_neither_keras_nor_a_backend():
    """``python -m kquant.cli`` starts as the console script does (it skipped nothing
    before, and took ~6 s to import TensorFlow for ``--help``)."""
    from kquant.benchmarks.cli import imported_packages

    imported = imported_packages(["-m", "kquant.cli", "--help"])
    assert {"kquant", "click"} <= imported
    assert not imported & {"keras", "tensorflow", "jax", "torch"}


def test_plain_import_kquant_reloads_saved_models(tmp_path):
    """A fresh process that only does ``import kquant`` can load a .keras with kquant layers."""
    save = ("import keras, kquant; m = keras.Sequential([keras.Input((4,)), "
            "kquant.QuantDense(3, kernel_quantizer='bwn', input_quantizer='sign')]); "
            f"m.save({str(tmp_path / 'm.keras')!r})")
    load = ("import kquant, keras; "
            f"m = keras.saving.load_model({str(tmp_path / 'm.keras')!r}); "
            "print(type(m.layers[0]).__name__, type(m.layers[0].kernel_quantizer).__name__)")
    for code in (save, load):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["QuantDense", "BWN"]


@pytest.mark.core
def test_lazy_package_keeps_the_public_names():
    from kquant import QuantDense, quantize_model, quantizer  # noqa: F401

    assert kquant.QuantDense is QuantDense
    assert callable(kquant.summary) and kquant.summary.__module__ == "kquant.summary"
    import importlib

    importlib.import_module("kquant.summary")  # importing the submodule keeps the function

    assert callable(kquant.summary)
    for name in kquant.__all__:
        assert getattr(kquant, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kquant.nope


def test_plot_estimators_writes_a_png_per_elementwise_estimator(tmp_path):
    pytest.importorskip("matplotlib")
    out = CliRunner().invoke(main, ["plot", "estimators", "-o", str(tmp_path / "figs")])
    assert out.exit_code == 0, out.output
    from kquant.estimators import ElementwiseEstimator, registry

    elementwise = [i.name for i in registry.info() if issubclass(i.cls, ElementwiseEstimator)]
    assert {"ste", "htge", "clipped_ste"} <= set(elementwise)
    for name in elementwise:
        assert (tmp_path / "figs" / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
    assert (tmp_path / "figs" / "estimators.png").is_file()
    from kquant.plots import estimator_curves

    curves, _ = estimator_curves(points=7)  # s = -3, -2, ..., 3
    s, f, d = curves["clipped_ste"]
    np.testing.assert_allclose(d, [0, 0, 1, 1, 1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(f, np.clip(s, -1, 1), atol=1e-6)
