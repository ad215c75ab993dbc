"""End to end: training on the embedded digits, the CLI, dataset loading."""

import numpy as np
import pytest
from click.testing import CliRunner


from kquant import datasets, training
from kquant.cli import main
from kquant.testing import run_on_two_cpus


@pytest.mark.slow
def test_quantized_convnet_learns_digits_and_float_twin_does_better():
    result = training.fit(kernel_quantizer="bwn", epochs=6, learning_rate=3e-3,
                          float_baseline=True, verbose=0)
    losses = result.history["loss"]
    print(f"digits: BWN convnet {result.test_accuracy:.4f}, float twin {result.float_accuracy:.4f}")
    assert losses[-1] < 0.5 * losses[0]
    assert result.test_accuracy >= 0.90          # stated: BWN weights reach 90 % in 6 epochs
    assert result.float_accuracy >= result.test_accuracy - 0.005
    assert 0 <= result.history["flip_ratio"][-1] < 0.5


def test_cli_lists_estimators_with_packages():
    out = CliRunner().invoke(main, ["estimators"])
    assert out.exit_code == 0, out.output
    for name in ("ste", "htge", "approx_sign"):
        assert name in out.output
    assert "kquant" in out.output


def test_cli_fit_prints_accuracy_and_summary(tmp_path):
    out = CliRunner().invoke(main, ["fit", "--epochs", "1", "--quiet", "--quantizer", "dorefa",
                                    "--bits", "2", "--estimator", "htge",
                                    "--export", str(tmp_path / "w.npz")])
    assert out.exit_code == 0, out.output
    assert "test accuracy:" in out.output and "kquant summary" in out.output
    assert (tmp_path / "w.npz").exists()


@pytest.mark.parametrize("args, message", [
    (["--estimator", "nope"], "Installed estimators"),
    (["--quantizer", "sign", "--bits", "3"], "bits"),
    (["--dataset", "mnist", "--data-dir", "does-not-exist"], "not available"),
])
def test_cli_fit_bad_input_fails_clearly(args, message):
    out = CliRunner().invoke(main, ["fit", "--epochs", "1", "--quiet", *args])
    assert out.exit_code != 0 and message in out.output


def test_fit_compiles_both_models_as_asked_and_trains_under_xla(monkeypatch):
    """``jit_compile`` reaches the float twin and the quantized model; on, the quantized
    model trains under XLA and learns."""
    import keras

    compiled = []
    original = keras.Model.compile

    def compile(self, *args, **kwargs):
        compiled.append(kwargs.get("jit_compile"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "compile", compile)
    result = training.fit(kernel_quantizer="dorefa", bits=2, epochs=2, batch_size=128,
                          float_baseline=True, verbose=0, jit_compile=True)
    assert compiled == [True, True] and result.model.jit_compile is True
    assert result.history["loss"][-1] < result.history["loss"][0]
    with pytest.raises(ValueError, match="`jit_compile` must be 'auto', True or False"):
        training.fit(jit_compile="on")


def test_digits_loader_shapes():
    (x, y), (xt, yt) = datasets.load("digits")
    assert x.shape[1:] == (8, 8, 1) and x.dtype == np.float32 and 0 <= x.min() <= x.max() <= 1
    assert len(x) + len(xt) == 1797 and set(np.unique(y)) == set(range(10))
    with pytest.raises(ValueError, match="digits"):
        datasets.load("imagenet")


@pytest.mark.tf_only
def test_mirrored_strategy_matches_single_device():
    """fit under MirroredStrategy (2 logical CPUs) equals a single-device fit."""
    out = run_on_two_cpus("""
        import numpy as np, tensorflow as tf, keras, kquant
        rng = np.random.default_rng(0)
        x = rng.random((64, 8, 8, 1)).astype("float32"); y = rng.integers(0, 10, 64)
        def run(strategy):
            with strategy.scope():
                keras.utils.set_random_seed(0)
                m = keras.Sequential([  # no batch norm: its statistics are per replica
                    keras.Input((8, 8, 1)),
                    kquant.QuantConv2D(4, 3, kernel_quantizer=kquant.quantizer("dorefa", bits=2, estimator="htge")),
                    keras.layers.ReLU(), keras.layers.Flatten(),
                    kquant.QuantDense(10, kernel_quantizer="bwn", input_quantizer="sign")])
                m.compile(keras.optimizers.SGD(0.05),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            m.fit(x, y, epochs=2, batch_size=32, shuffle=False, verbose=0)
            return [w.numpy() for w in m.weights]
        mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert mirrored.num_replicas_in_sync == 2
        a, b = run(tf.distribute.get_strategy()), run(mirrored)
        print("MAXDIFF", max(float(np.abs(u - v).max()) for u, v in zip(a, b)))
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    diff = float(out.stdout.split("MAXDIFF")[1])
    assert diff < 1e-4, diff


