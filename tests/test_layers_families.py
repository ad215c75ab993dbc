"""Conv3D, transposed, separable, depthwise-1D, EinsumDense, LSTM/GRU and attention twins.

For each: the float twin without quantizers gives the Keras layer's outputs,
sign kernels change them and the clipped-STE gradient of every quantized
kernel is the float layer's gradient at the quantized kernel, masked by
``|w| ≤ 1``; a model of all of them round-trips through ``.keras``.
"""

import keras
import numpy as np
import pytest
from keras import layers, ops

import kquant
from kquant.testing import variable_grads

RNG = np.random.default_rng(0)
# eager fits: no tracing on TensorFlow and torch; JAX compiles every eager op on its own
# (this module's every-family round trip: 29 s eager, 17 s compiled)
EAGER = keras.backend.backend() != "jax"


def _x(*shape):
    return RNG.normal(size=shape).astype("float32")


# name: (quantized class, float class, positional args, input)
FAMILIES = {
    "conv3d": (kquant.QuantConv3D, layers.Conv3D, (3, 2), _x(2, 3, 3, 3, 2)),
    "conv1d_transpose": (kquant.QuantConv1DTranspose, layers.Conv1DTranspose, (3, 2),
                         _x(2, 4, 2)),
    "conv2d_transpose": (kquant.QuantConv2DTranspose, layers.Conv2DTranspose, (3, 2),
                         _x(2, 3, 3, 2)),
    "conv3d_transpose": (kquant.QuantConv3DTranspose, layers.Conv3DTranspose, (3, 2),
                         _x(2, 2, 2, 2, 2)),
    "separable1d": (kquant.QuantSeparableConv1D, layers.SeparableConv1D, (3, 2), _x(2, 5, 2)),
    "separable2d": (kquant.QuantSeparableConv2D, layers.SeparableConv2D, (3, 2),
                    _x(2, 4, 4, 2)),
    "depthwise1d": (kquant.QuantDepthwiseConv1D, layers.DepthwiseConv1D, (2,), _x(2, 5, 3)),
    "einsum": (kquant.QuantEinsumDense, layers.EinsumDense, ("abc,cde->abde", (None, 2, 3)),
               _x(2, 3, 4)),
    "lstm": (kquant.QuantLSTM, layers.LSTM, (3,), _x(2, 4, 2)),
    "gru": (kquant.QuantGRU, layers.GRU, (3,), _x(2, 4, 2)),
    "gru_reset_before": (kquant.QuantGRU, layers.GRU, (3,), _x(2, 4, 2)),
    "attention": (kquant.QuantMultiHeadAttention, layers.MultiHeadAttention, (2, 3),
                  _x(2, 3, 4)),
}
EXTRA = {"gru_reset_before": {"reset_after": False, "unroll": True},
         "depthwise1d": {"depth_multiplier": 2}, "gru": {"unroll": True}}  # lstm: the scan path


def _call(layer, x):
    return layer(x, x) if "MultiHeadAttention" in type(layer).__name__ else layer(x)


def _pair(name, **quantizers):
    """A built quantized layer and its float twin sharing the same weights."""
    qcls, fcls, args, x = FAMILIES[name]
    kwargs = {**EXTRA.get(name, {}), "bias_initializer": "random_normal"}
    if name == "einsum":
        kwargs["bias_axes"] = "de"
    f = fcls(*args, **kwargs)
    q = qcls(*args, **kwargs, **quantizers)
    _call(f, x), _call(q, x)
    own = [w for w in q.weights if not _in_quantizer(q, w)]
    assert len(own) == len(f.weights)
    for a, b in zip(own, f.weights):
        a.assign(RNG.normal(scale=1.5, size=tuple(a.shape)))  # some latent weights beyond ±1
        b.assign(ops.convert_to_numpy(a))
    return q, f, x


def _in_quantizer(layer, weight):
    return any(weight is w for sub in layer._flatten_layers(include_self=False)
               if isinstance(sub, kquant.quantizers.Quantizer) for w in sub.weights)


def _quantized_pairs(q):
    """``(latent, quantizer)`` for every quantized kernel (attention: its projections)."""
    if isinstance(q, kquant.QuantMultiHeadAttention):
        return [p for sub in q._flatten_layers(include_self=False)
                if isinstance(sub, kquant.layers.QuantizedLayerMixin)
                for p in sub.quantized_kernels()]
    return q.quantized_kernels()


def _kernel_kwargs(name):
    sign = lambda: kquant.quantizers.Sign(estimator="clipped_ste")  # noqa: E731
    if name in ("lstm", "gru", "gru_reset_before"):
        return {"kernel_quantizer": sign(), "recurrent_quantizer": sign()}
    if name.startswith("separable"):
        return {"depthwise_quantizer": sign(), "pointwise_quantizer": sign()}
    return {"kernel_quantizer": sign()}


@pytest.mark.core
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_twin_without_quantizers_matches_keras_and_sign_kernels_change_it(name):
    q, f, x = _pair(name)
    np.testing.assert_allclose(ops.convert_to_numpy(_call(q, x)),
                               ops.convert_to_numpy(_call(f, x)), rtol=1e-6, atol=1e-6)
    qs, fs, xs = _pair(name, **_kernel_kwargs(name))
    pairs = _quantized_pairs(qs)
    assert pairs and all(qz is not None for _, qz in pairs)
    assert not np.allclose(ops.convert_to_numpy(_call(qs, xs)),
                           ops.convert_to_numpy(_call(fs, xs)), atol=1e-3)


@pytest.mark.core
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_gradient_of_quantized_kernels_is_clipped_ste(name):
    q, f, x = _pair(name, **_kernel_kwargs(name))
    pairs = _quantized_pairs(q)
    latents = [v for v, _ in pairs]
    # the float layer holds sign(latent) in the same slots
    f_by_shape = [w for w in f.weights]
    own = [w for w in q.weights if not _in_quantizer(q, w)]
    slots = [next(i for i, w in enumerate(own) if w is v) for v in latents]
    for i, v in zip(slots, latents):
        f_by_shape[i].assign(np.where(ops.convert_to_numpy(v) >= 0, 1.0, -1.0))
    y_shape = tuple(_call(q, x).shape)
    upstream = ops.convert_to_tensor(RNG.normal(size=y_shape).astype("float32"))
    grads_q = variable_grads(latents, lambda: ops.sum(_call(q, x) * upstream))
    grads_f = variable_grads([f_by_shape[i] for i in slots],
                             lambda: ops.sum(_call(f, x) * upstream))
    np.testing.assert_allclose(ops.convert_to_numpy(_call(q, x)),
                               ops.convert_to_numpy(_call(f, x)), rtol=1e-5, atol=1e-5)
    masks = [np.abs(ops.convert_to_numpy(v)) <= 1.0 for v in latents]
    assert 0 < np.mean(np.concatenate([m.ravel() for m in masks])) < 1  # the clip is exercised
    for mask, gq, gf in zip(masks, grads_q, grads_f):
        assert np.any(gf != 0)
        np.testing.assert_allclose(gq, gf * mask, rtol=1e-5, atol=1e-6)


def all_families_model():
    """A functional model holding every new layer, quantized."""
    def bwn():
        return kquant.quantizers.BWN(per_channel=True)

    def uni():
        return kquant.quantizers.Uniform(bits=4, symmetric=False)

    inp = keras.Input((4, 4, 2))
    seq = layers.Reshape((16, 2))(inp)
    short = layers.Reshape((4, 8))(inp)  # few time steps: recurrent layers stay cheap
    outs = [
        kquant.QuantConv3D(2, 2, kernel_quantizer=bwn(), input_quantizer=uni())(
            layers.Reshape((4, 4, 2, 1))(inp)),
        kquant.QuantConv2DTranspose(2, 2, kernel_quantizer=bwn(), input_quantizer="sign")(inp),
        kquant.QuantConv1DTranspose(2, 2, kernel_quantizer="dorefa")(seq),
        kquant.QuantSeparableConv2D(2, 2, kernel_quantizer=bwn(), input_quantizer=uni())(inp),
        kquant.QuantSeparableConv1D(2, 2, depthwise_quantizer="sign",
                                    pointwise_quantizer=uni())(seq),
        kquant.QuantDepthwiseConv1D(2, kernel_quantizer=bwn())(seq),
        kquant.QuantEinsumDense("abc,cd->abd", (16, 3), kernel_quantizer=bwn(),
                                input_quantizer=uni())(seq),
        # unrolled: eager JAX would compile a scan per call
        kquant.QuantLSTM(3, kernel_quantizer=bwn(), recurrent_quantizer="sign",
                         input_quantizer=uni(), unroll=True)(short),
        kquant.QuantGRU(3, kernel_quantizer="sign", recurrent_quantizer=bwn(),
                        unroll=True)(short),
        kquant.QuantMultiHeadAttention(2, 2, kernel_quantizer=bwn(), input_quantizer=uni())(
            short, short),
        kquant.QuantActivation(uni())(seq),
        kquant.quantizers.Sign()(seq),  # a bare quantizer as a layer
    ]
    out = layers.Dense(2)(layers.Concatenate()([layers.Flatten()(t) for t in outs]))
    return keras.Model(inp, out)


def _fit_lowers_loss(model, x, y, **compile_kwargs):
    model.compile(keras.optimizers.Adam(1e-2), "mse", **compile_kwargs)
    losses = model.fit(x, y, epochs=2, batch_size=8, verbose=0).history["loss"]
    assert losses[-1] < losses[0]


def _assert_same_predictions(a, b, x):
    np.testing.assert_array_equal(ops.convert_to_numpy(a(x, training=False)),
                                  ops.convert_to_numpy(b(x, training=False)))


@pytest.mark.core
def test_every_family_trains_and_round_trips_through_keras_file(tmp_path):
    model = all_families_model()
    x, y = _x(8, 4, 4, 2), _x(8, 2)
    _fit_lowers_loss(model, x, y, run_eagerly=EAGER)
    path = tmp_path / "families.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    _assert_same_predictions(model, loaded, x)
    for layer in loaded._flatten_layers(include_self=False):
        if isinstance(layer, (kquant.layers.QuantizedLayerMixin, kquant.QuantActivation)):
            config = layer.get_config()
            assert type(layer).from_config(config).get_config() == config
    # training continues from the same state (optimizer included)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    loaded.fit(x, y, epochs=1, batch_size=8, verbose=0)
    np.testing.assert_allclose(ops.convert_to_numpy(model(x, training=False)),
                               ops.convert_to_numpy(loaded(x, training=False)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() == "torch", reason="jit_compile: TF (XLA) and JAX")
def test_recurrent_attention_and_transposed_layers_fit_under_jit_compile(tmp_path):
    inp = keras.Input((4, 4, 2))
    short = layers.Reshape((4, 8))(inp)
    bwn = lambda: kquant.quantizers.BWN(per_channel=True)  # noqa: E731
    outs = [
        kquant.QuantLSTM(3, kernel_quantizer=bwn(), recurrent_quantizer="sign",
                         input_quantizer=kquant.quantizers.Uniform(bits=4, symmetric=False))(short),
        kquant.QuantGRU(3, kernel_quantizer="sign", recurrent_quantizer=bwn())(short),
        kquant.QuantMultiHeadAttention(2, 2, kernel_quantizer=bwn(), input_quantizer="sign")(
            short, short),
        kquant.QuantConv2DTranspose(2, 2, kernel_quantizer=bwn())(inp),
    ]
    model = keras.Model(inp, layers.Dense(2)(layers.Concatenate()(
        [layers.Flatten()(t) for t in outs])))
    x, y = _x(8, 4, 4, 2), _x(8, 2)
    _fit_lowers_loss(model, x, y, jit_compile=True)
    model.save(tmp_path / "jit.keras")
    _assert_same_predictions(model, keras.saving.load_model(tmp_path / "jit.keras"), x)


@pytest.mark.core
def test_recurrent_layers_refuse_cudnn_and_never_take_the_fused_path():
    with pytest.raises(ValueError, match="use_cudnn"):
        kquant.QuantLSTM(2, kernel_quantizer="sign", use_cudnn=True)
    with pytest.raises(ValueError, match="use_cudnn"):
        kquant.QuantGRU(2, kernel_quantizer="sign", use_cudnn=True)
    assert kquant.QuantLSTM(2, use_cudnn="auto").use_cudnn is False


@pytest.mark.core
def test_bad_quantizer_arguments_name_the_argument():
    sign = kquant.quantizers.Sign()
    with pytest.raises(ValueError, match="`estimator`.*`kernel_quantizer`"):
        kquant.QuantDense(2, kernel_quantizer=sign, estimator="ste")
    with pytest.raises(ValueError, match="`input_quantizer`"):
        kquant.QuantConv3D(2, 2, input_quantizer=sign, estimator="ste")
    with pytest.raises(ValueError, match="`recurrent_quantizer`"):
        kquant.QuantLSTM(2, recurrent_quantizer=sign, estimator="ste")
    with pytest.raises(ValueError, match="kernel_quantizer"):
        kquant.QuantSeparableConv2D(2, 2, kernel_quantizer="sign", depthwise_quantizer="sign")
    with pytest.raises(ValueError, match="`quantizer`"):
        kquant.QuantActivation(None)
    with pytest.raises(ValueError, match="`equation`"):
        kquant.QuantEinsumDense("abc", 3)
    with pytest.raises(ValueError, match="`channel_axes`"):
        kquant.quantizers.BWN(per_channel=True, channel_axes="last")


@pytest.mark.core
def test_whole_tensor_estimators_are_refused_on_inputs_but_not_kernels():
    class WholeTensor(kquant.estimators.Estimator):
        whole_tensor = True

        def gradient(self, upstream, ctx):
            return upstream

    kquant.QuantDense(2, kernel_quantizer=kquant.quantizers.Sign(estimator=WholeTensor()))
    for make in (lambda q: kquant.QuantDense(2, input_quantizer=q),
                 lambda q: kquant.QuantActivation(q),
                 lambda q: kquant.QuantLSTM(2, input_quantizer=q)):
        with pytest.raises(ValueError, match="whole-tensor"):
            make(kquant.quantizers.Sign(estimator=WholeTensor()))
