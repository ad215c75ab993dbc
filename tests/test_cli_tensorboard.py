"""TensorBoard: kquant's diagnostics (flip ratio, skipped steps, average and per-layer
bits) reach the event files of Keras' TensorBoard callback; `kquant fit --tensorboard`."""

import pathlib

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import kquant
from kquant.callbacks import FlipRatio, NonFiniteReport, QuantizationLogger

BACKEND = keras.backend.backend()


def _events(log_dir):
    """{tag: [(step, value or histogram)]} from every event file under ``log_dir``."""
    tf = pytest.importorskip("tensorflow")
    from tensorflow.core.util import event_pb2

    found = {}
    for path in sorted(pathlib.Path(log_dir).rglob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor) if value.HasField("tensor") else value.simple_value
                found.setdefault(value.tag, []).append((event.step, tensor))
    return found


def _model():
    return keras.Sequential([
        keras.Input((6,)),
        kquant.QuantDense(8, kernel_quantizer=kquant.quantizer("dorefa", bits=2)),
        keras.layers.ReLU(),
        kquant.QuantDense(3, kernel_quantizer="sign"),
    ])


def test_kquant_scalars_and_bit_histograms_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 6)).astype("float32"), rng.integers(0, 3, 64)
    model = _model()
    model.compile(kquant.optimizers.SkipNonFinite(keras.optimizers.Adam(1e-2)),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path))
    logger = QuantizationLogger(board)
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0,
                        callbacks=[NonFiniteReport(), FlipRatio(), logger, board])
    # 2-bit layer (8·6 weights) and 1-bit layer (3·8 weights): (96 + 24) / 72
    assert history.history["average_bits"] == pytest.approx([120 / 72] * 2)
    assert logger.history[-1] == {model.layers[0].name: 2.0, model.layers[2].name: 1.0}
    events = _events(tmp_path)
    for tag in ("epoch_loss", "epoch_flip_ratio", "epoch_skipped_steps", "epoch_average_bits"):
        assert [step for step, _ in events[tag]] == [0, 1], tag
    assert float(events["epoch_average_bits"][-1][1]) == pytest.approx(120 / 72)
    assert float(events["epoch_skipped_steps"][-1][1]) == 0.0
    flips = [float(v) for _, v in events["epoch_flip_ratio"]]
    assert flips == pytest.approx(history.history["flip_ratio"])
    if BACKEND == "tensorflow":  # per-layer bits through the TensorBoard callback's writer
        assert float(events[f"bits/{model.layers[0].name}"][0][1]) == 2.0
        histogram = events["bits/per_layer"][-1][1]  # rows: (left edge, right edge, count)
        assert histogram[:, 2].sum() == 2 and histogram[:, 0].min() == pytest.approx(1.0)
        assert histogram[:, 1].max() == pytest.approx(2.0)


def test_quantization_logger_rejects_a_non_tensorboard_callback():
    with pytest.raises(TypeError, match="`tensorboard` must be a keras.callbacks.TensorBoard"):
        QuantizationLogger(keras.callbacks.History())


@pytest.mark.tf_only  # output and logging paths are backend-independent; TF pass only
def test_cli_fit_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorflow")
    out = CliRunner().invoke(kquant.cli.main, ["fit", "--epochs", "1", "--quiet", "--batch-size", "256",
                                               "--tensorboard", str(tmp_path / "tb")])
    assert out.exit_code == 0, out.output
    events = _events(tmp_path / "tb")
    assert {"epoch_flip_ratio", "epoch_average_bits", "epoch_skipped_steps"} <= set(events)
    assert float(events["epoch_average_bits"][0][1]) == pytest.approx(1.0)  # BWN everywhere
