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


def test_top_k_cap_binds_per_layer():
    """Issue #10: each layer offers a share of its own bases, so a small layer holding the
    lowest f cannot cover a whole step (the old per-layer minimum quota let it)."""
    big = ALQDense(8, max_bits=4, group=8)
    big.build((None, 16))      # 16 groups × 4 bases
    small = ALQDense(1, max_bits=4, group=8)
    small.build((None, 16))    # 2 groups × 4 bases: 1/9 of the budget
    layers = [big, small]
    opt = ALQ(1e-3)
    opt.build(big.trainable_variables + small.trainable_variables)
    for layer in layers:
        opt.alpha_moments(layer)[2].assign(np.full(layer.mask.shape, 1e-4, "float32"))
    opt.alpha_moments(small)[0].assign(np.full(small.mask.shape, 1e4, "float32"))  # lowest f
    opt.iterations.assign(10)
    budget = 8 * (int(big.group_bitwidths().sum()) + int(small.group_bitwidths().sum()))
    bits = 0.05 * budget  # 3.6 bases; the small layer alone could cover it
    removed = pruning.prune_once(layers, opt, bits_to_remove=bits, top_k=0.01)
    share = pruning.CHOICE * 0.05
    assert removed[1] == int(np.ceil(share * 8)) and removed[0] > 0
    assert 8 * sum(removed) >= bits


def test_round_targets_follow_the_ratio_without_a_final_jump():
    """Issue #10: the last round no longer jumps to target_bits; enough rounds reach it."""
    from kquant.alq import ALQSchedule

    schedule = ALQSchedule(rounds=3, ratio=0.7, target_bits=0.7)
    np.testing.assert_allclose(schedule.round_targets(6.0), [4.2, 2.94, 2.058])
    rounds = ALQSchedule.rounds_needed(6.0, 0.7, 0.6)
    assert rounds == 5 and 6.0 * 0.6 ** (rounds - 1) > 0.7 >= 6.0 * 0.6 ** rounds
    targets = ALQSchedule(rounds=rounds, ratio=0.6, target_bits=0.7).round_targets(6.0)
    np.testing.assert_allclose(targets, [3.6, 2.16, 1.296, 0.7776, 0.7])
    with pytest.raises(ValueError, match="ratio"):
        ALQSchedule.rounds_needed(6.0, 0.7, 1.0)
