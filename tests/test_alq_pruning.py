"""Alg. 2 pruning: scheduled counts, lowest-f choice across layers, target bitwidth, zero groups."""

import keras
import numpy as np
import pytest
from keras import ops

from kquant.alq import ALQDense, PruningRun, average_bitwidth
from kquant.alq import pruning
from kquant.optimizers import ALQ


def _np(v):
    return np.asarray(ops.convert_to_numpy(v))


def _two_layers():
    first = ALQDense(4, max_bits=4, group=8)
    first.build((None, 16))
    second = ALQDense(2, max_bits=4, group=8)
    second.build((None, 16))
    opt = ALQ(1e-3)
    opt.build(first.trainable_variables + second.trainable_variables)
    rng = np.random.default_rng(0)
    for layer in (first, second):  # give the α-domain model some state
        m, v, vmax = opt.alpha_moments(layer)
        m.assign(rng.normal(size=m.shape).astype("float32") * 0.01)
        vmax.assign(rng.uniform(1e-4, 1e-2, size=vmax.shape).astype("float32"))
    opt.iterations.assign(10)
    return [first, second], opt


def test_prune_once_removes_lowest_f_across_layers():
    layers, opt = _two_layers()
    f = [pruning.importance(l, opt) for l in layers]
    everything = np.sort(np.concatenate([x[np.isfinite(x)] for x in f]))
    count = 7
    removed = pruning.prune_once(layers, opt, bits_to_remove=count * 8, top_k=1.0)
    assert sum(removed) == count and all(r > 0 for r in removed)  # both layers contribute
    threshold = everything[count - 1]
    for layer, before in zip(layers, f):
        mask = _np(layer.mask)
        gone = np.isfinite(before) & (mask == 0)
        assert (before[gone] <= threshold).all()
        assert (before[np.isfinite(before) & (mask > 0)] >= threshold).all()
        assert (_np(layer.coordinates)[mask == 0] == 0).all()
        assert (_np(opt.alpha_moments(layer)[0])[gone] == 0).all()


def test_schedule_counts_and_target_reached():
    layers, opt = _two_layers()
    start = sum(int(l.group_bitwidths().sum()) for l in layers)
    target_bits = 0.66
    run = PruningRun(layers, opt, target_bits=target_bits, steps=4, top_k=0.05)
    total_weights = sum(l.layout.num_weights for l in layers)
    per_step = []
    for t in range(1, 5):
        before = sum(int(l.group_bitwidths().sum()) for l in layers)
        run.step()
        after = sum(int(l.group_bitwidths().sum()) for l in layers)
        goal = (start * 8 + (target_bits * total_weights - start * 8) * t / 4) / 8  # in bases
        assert after == int(np.floor(goal + 1e-9))  # exactly the scheduled count, no more
        per_step.append(before - after)
    assert max(per_step) - min(per_step) <= 1  # M_p per step, uniform
    assert average_bitwidth(layers) <= target_bits
    assert average_bitwidth(layers) > target_bits - 8 / total_weights * 1.01
    assert run.finished


def test_zero_bit_group_outputs_zero_and_stays_stable():
    layer = ALQDense(2, max_bits=3, group=4, use_bias=False)
    layer.build((None, 8))
    mask = _np(layer.mask).copy()
    mask[0] = 0  # group 0 = inputs 0..3 of unit 0
    layer.mask.assign(mask)
    layer.coordinates.assign(_np(layer.coordinates) * mask)
    x = np.zeros((3, 8), "float32")
    x[:, :4] = np.random.default_rng(1).normal(size=(3, 4))
    np.testing.assert_array_equal(_np(layer(x))[:, 0], 0.0)
    for phase in ("bases", "coordinates"):
        opt = ALQ(0.1, phase=phase)
        for _ in range(3):
            grads = [ops.convert_to_tensor(np.random.default_rng(2).normal(size=v.shape)
                                           .astype("float32")) for v in layer.trainable_variables]
            opt.apply(grads, layer.trainable_variables)
        assert (_np(layer.mask)[0] == 0).all() and (_np(layer.coordinates)[0] == 0).all()
        np.testing.assert_array_equal(_np(layer(x))[:, 0], 0.0)
        assert np.isfinite(_np(layer.coordinates)).all()


def test_pruning_callback_in_fit():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)), ALQDense(8, max_bits=3, activation="relu"),
                              ALQDense(3, max_bits=3, group=8)])
    model.compile(ALQ(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(3).random((64, 16)).astype("float32")
    y = np.random.default_rng(4).integers(0, 3, 64)
    callback = pruning.ALQPruning(target_bits=1.0, steps=4)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[callback])
    assert average_bitwidth(model.layers) <= 1.0
    assert [h["step"] for h in callback.run.history] == [1, 2, 3, 4]
    assert model.optimizer.phase == "coordinates"


def test_invalid_pruning_arguments():
    layers, opt = _two_layers()
    with pytest.raises(ValueError, match="steps"):
        PruningRun(layers, opt, 1.0, steps=0)
    with pytest.raises(ValueError, match="top_k"):
        PruningRun(layers, opt, 1.0, steps=2, top_k=0)
