"""The ALQ pipeline interrupted after round 1 resumes exactly (BackupAndRestore; save → load)."""

import keras
import numpy as np
import pytest
from keras import ops

from alq_toys import toy_data, toy_model
from kquant.alq import fit_pipeline

KW = dict(batch_size=32, rounds=2, prune_epochs=1, bases_epochs=1, coordinates_epochs=1,
          bases_lr=1e-2, coordinates_lr=1e-2, ratio=0.6, verbose=0, shuffle=False)
ROUND_1_EPOCHS = 3


def _data():
    return toy_data(96)


_model = toy_model


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == ROUND_1_EPOCHS:
            raise RuntimeError("interrupted")


class _StopAfterRound1(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == ROUND_1_EPOCHS:
            self.model.stop_training = True


def _np(v):
    return np.asarray(ops.convert_to_numpy(v), dtype=np.float64)


@pytest.fixture(scope="module")
def uninterrupted():
    x, y = _data()
    model = _model()
    _, schedule = fit_pipeline(model, x, y, **KW)
    return [_np(w) for w in model.weights], [r["average_bits"] for r in schedule.log]


def _assert_same(model, schedule, uninterrupted):
    weights, bits = uninterrupted
    assert [r["average_bits"] for r in schedule.log] == bits[ROUND_1_EPOCHS:]
    assert bits[ROUND_1_EPOCHS] < bits[0]  # round 2 pruned further (0.6 × round 1's target)
    for a, b in zip(weights, model.weights):
        np.testing.assert_allclose(_np(b), a, rtol=1e-5, atol=1e-6)


def test_backup_and_restore_resumes_round_2_exactly(tmp_path, uninterrupted):
    x, y = _data()
    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupted"):
        fit_pipeline(_model(), x, y, callbacks=[keras.callbacks.BackupAndRestore(backup),
                                                _Interrupt()], **KW)
    model = _model()  # a fresh process would rebuild the model from scratch
    _, schedule = fit_pipeline(model, x, y, callbacks=[keras.callbacks.BackupAndRestore(backup)],
                               **KW)
    _assert_same(model, schedule, uninterrupted)


def test_save_load_then_initial_epoch_resumes_exactly(tmp_path, uninterrupted):
    x, y = _data()
    model = _model()
    fit_pipeline(model, x, y, callbacks=[_StopAfterRound1()], **KW)
    state = model.optimizer.schedule_state()
    assert state["start_bits"] is not None and state["prune_start_budget"] is None
    path = tmp_path / "round1.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert restored.optimizer.schedule_state() == state
    _, schedule = fit_pipeline(restored, x, y, initial_epoch=ROUND_1_EPOCHS, **KW)
    _assert_same(restored, schedule, uninterrupted)


def test_resume_without_saved_state_is_refused():
    x, y = _data()
    with pytest.raises(ValueError, match="cannot resume"):
        fit_pipeline(_model(), x, y, initial_epoch=ROUND_1_EPOCHS, **KW)
    with pytest.raises(ValueError, match="initial_epoch"):
        fit_pipeline(_model(), x, y, initial_epoch=-1, **KW)
    with pytest.raises(ValueError, match="`jit_compile` must be 'auto', True or False, got 1"):
        fit_pipeline(_model(), x, y, **{**KW, "jit_compile": 1})
