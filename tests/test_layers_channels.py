"""Per-channel quantizers see the layer's channel axes (issue #12): one BWN scale per
output channel for every kernel layout, one input step per channel in either data format."""

import keras
import numpy as np
import pytest
from keras import ops

import kquant
from kquant.testing import take_step
from kquant.quantizers import BWN, Uniform, channels

pytestmark = pytest.mark.core


def _bwn():
    return BWN(per_channel=True)


# layer, input shape, {kernel attribute: its output-channel axes}
CASES = {
    "dense": (lambda: kquant.QuantDense(3, kernel_quantizer=_bwn()), (2, 4), {"kernel": (1,)}),
    "conv2d": (lambda: kquant.QuantConv2D(3, 2, kernel_quantizer=_bwn()), (2, 4, 4, 2),
               {"kernel": (3,)}),
    "depthwise2d": (lambda: kquant.QuantDepthwiseConv2D(2, depth_multiplier=2,
                                                        kernel_quantizer=_bwn()),
                    (2, 4, 4, 3), {"kernel": (2, 3)}),
    "conv2d_transpose": (lambda: kquant.QuantConv2DTranspose(3, 2, kernel_quantizer=_bwn()),
                         (2, 3, 3, 2), {"kernel": (2,)}),
    "separable2d": (lambda: kquant.QuantSeparableConv2D(
        3, 2, depth_multiplier=2, kernel_quantizer=_bwn()), (2, 4, 4, 2),
        {"depthwise_kernel": (2, 3), "pointwise_kernel": (3,)}),
    "einsum": (lambda: kquant.QuantEinsumDense("abc,cde->abde", (None, 2, 3),
                                               kernel_quantizer=_bwn()),
               (2, 3, 4), {"kernel": (1, 2)}),
    "lstm": (lambda: kquant.QuantLSTM(2, kernel_quantizer=_bwn(), recurrent_quantizer=_bwn()),
             (2, 3, 4), {"kernel": (1,), "recurrent_kernel": (1,)}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bwn_per_channel_scales_are_the_means_over_each_output_channel(case):
    make, shape, expected_axes = CASES[case]
    layer = make()
    layer(np.random.default_rng(0).normal(size=shape).astype("float32"))
    pairs = layer.quantized_kernels()
    owners = layer.cell if case == "lstm" else layer
    assert len(pairs) == len(expected_axes)
    for (variable, quantizer), (attr, axes) in zip(pairs, expected_axes.items()):
        assert variable is getattr(owners, attr)
        assert quantizer.channel_axes == axes
        w = ops.convert_to_numpy(variable)
        _, params = quantizer.encode(w)
        reduce = tuple(a for a in range(w.ndim) if a not in axes)
        np.testing.assert_allclose(params["scale"],
                                   np.mean(np.abs(w), axis=reduce, keepdims=True), rtol=1e-6)
        assert params["scale"].size == np.prod([w.shape[a] for a in axes])
        assert quantizer.extra_bits(w.shape) == 32 * params["scale"].size
        np.testing.assert_allclose(  # the forward pass uses exactly these scales
            ops.convert_to_numpy(quantizer(w)),
            np.where(w >= 0, 1.0, -1.0) * params["scale"], rtol=1e-6)


def test_depthwise_bwn_has_one_scale_per_input_channel_times_multiplier():
    layer = kquant.QuantDepthwiseConv2D(2, depth_multiplier=2, kernel_quantizer=_bwn())
    layer.build((None, 4, 4, 3))
    _, params = layer.kernel_quantizer.encode(ops.convert_to_numpy(layer.kernel))
    assert params["scale"].shape == (1, 1, 3, 2)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_per_channel_input_step_follows_data_format(data_format):
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 4)).astype("float32")  # 3 channels first
    x *= np.array([1.0, 5.0, 25.0], "float32")[None, :, None, None]
    axis = 1
    if data_format == "channels_last":
        x, axis = np.moveaxis(x, 1, -1), 3
    iq = Uniform(bits=4, per_channel=True)
    layer = kquant.QuantActivation(iq, data_format=data_format)
    take_step(layer, lambda: ops.sum(layer(x, training=True)))  # the first training step sets Δ₀
    y = ops.convert_to_numpy(layer(x))
    assert iq.channel_axes == (axis,)
    assert tuple(iq.step_scale.shape) == (3,)
    reduce = tuple(a for a in range(4) if a != axis)
    expected = 2.0 * np.mean(np.abs(x), axis=reduce) / np.sqrt(7.0)
    np.testing.assert_allclose(ops.convert_to_numpy(iq.step_init), expected, rtol=1e-5)
    step = expected.reshape([3 if a == axis else 1 for a in range(4)])
    np.testing.assert_allclose(y, np.clip(np.round(x / step), -8, 7) * step, rtol=1e-5,
                               atol=1e-6)
    conv = kquant.QuantConv2D(2, 2, data_format=data_format,
                              input_quantizer=Uniform(bits=4, per_channel=True))
    conv.build(x.shape)
    assert conv.input_quantizer.channel_axes == (axis,)
    assert tuple(conv.input_quantizer.step_scale.shape) == (3,)


def test_channel_axes_round_trip_and_old_configs_still_load():
    q = BWN(per_channel=True, channel_axes=[2, 3])
    assert BWN.from_config(q.get_config()).channel_axes == (2, 3)
    legacy = {"name": "bwn", "estimator": {"name": "clipped_ste", "config": {}},
              "per_channel": True}
    old = BWN.from_config(legacy)
    assert old.channel_axes is None and old.extra_bits((3, 4)) == 32 * 4
    assert channels.reduced_axes(4, (2, 3)) == (0, 1)
    with pytest.raises(ValueError, match="`channel_axes`"):
        Uniform(bits=4, channel_axes=1)  # per-tensor quantizer
    with pytest.raises(ValueError, match="out of range"):
        channels.resolve(2, (3,))


def test_layer_channel_axes_survive_keras_round_trip(tmp_path):
    model = keras.Sequential([
        keras.Input((4, 4, 3)),
        kquant.QuantDepthwiseConv2D(2, depth_multiplier=2, kernel_quantizer=_bwn()),
        kquant.QuantConv2DTranspose(2, 2, kernel_quantizer=_bwn()),
    ])
    x = np.random.default_rng(2).normal(size=(2, 4, 4, 3)).astype("float32")
    model.save(tmp_path / "axes.keras")
    loaded = keras.saving.load_model(tmp_path / "axes.keras")
    assert [layer.kernel_quantizer.channel_axes for layer in loaded.layers] == [(2, 3), (2,)]
    np.testing.assert_array_equal(ops.convert_to_numpy(model(x)), ops.convert_to_numpy(loaded(x)))
