"""Native deploy format: bit-identical round trips for every quantizer, estimator family,
layer type and model style; ALQ; tampered files give errors naming the array."""

import json

import keras
import numpy as np
import pytest
from keras import ops

import kquant
from kquant import deploy

pytestmark = pytest.mark.core

ESTIMATORS = kquant.estimators.available()
QUANTIZERS = kquant.quantizers.available()


def _q(name, estimator, **kwargs):
    return kquant.quantizer(name, estimator=estimator, **kwargs)


# (kernel quantizer, input quantizer, layer type, model style): every quantizer, every
# estimator family (elementwise, stateful, scheduled, whole-tensor), every layer, every style.
CASES = {
    "sign-clipped_ste-dense-sequential": (
        lambda: _q("sign", "clipped_ste"), lambda: _q("sign", "ste"), "dense", "sequential"),
    "bwn_channel-ste-conv2d-functional": (
        lambda: _q("bwn", "ste", per_channel=True), None, "conv2d", "functional"),
    "bwn_tensor-mad-conv1d-nested": (
        lambda: _q("bwn", "mad"), lambda: _q("uniform", "dsq", bits=4, symmetric=False),
        "conv1d", "nested"),
    "dorefa2-htge-depthwise-sequential": (
        lambda: _q("dorefa", "htge", bits=2), None, "depthwise", "sequential"),
    "dorefa3-ede-conv2d-nested": (
        lambda: _q("dorefa", "ede", bits=3), lambda: _q("uniform", "approx_sign", bits=3, step=0.25,
                                                         symmetric=False), "conv2d", "nested"),
    "uniform4_channel-dsq-dense-functional": (
        lambda: _q("uniform", "dsq", bits=4, per_channel=True),
        lambda: _q("uniform", "swish_sign", bits=4), "dense", "functional"),
    "uniform3-dsq_stateful-conv2d-sequential": (
        lambda: _q("uniform", "htge", bits=3), lambda: _q("uniform", "dsq", bits=8),
        "conv2d", "sequential"),
}
if "ewgs" in ESTIMATORS:
    CASES["dorefa2-ewgs-conv2d-functional"] = (
        lambda: _q("dorefa", "ewgs", bits=2), lambda: _q("uniform", "ewgs", bits=2, symmetric=False),
        "conv2d", "functional")
if "wcg" in ESTIMATORS:
    CASES["bwn-wcg-dense-nested"] = (lambda: _q("bwn", "wcg"), None, "dense", "nested")
if "ewgs" in QUANTIZERS:
    CASES["ewgs_quantizer-dense-sequential"] = (
        lambda: kquant.quantizer("ewgs"), None, "dense", "sequential")


def _quant_layer(kind, kq, iq):
    if kind == "dense":
        return [keras.layers.Flatten(), kquant.QuantDense(10, kernel_quantizer=kq, input_quantizer=iq)]
    if kind == "conv1d":
        return [keras.layers.Reshape((8, 8)),
                kquant.QuantConv1D(6, 3, kernel_quantizer=kq, input_quantizer=iq),
                keras.layers.Flatten(), keras.layers.Dense(10)]
    if kind == "conv2d":
        return [kquant.QuantConv2D(6, 3, kernel_quantizer=kq, input_quantizer=iq),
                keras.layers.BatchNormalization(), keras.layers.ReLU(),
                keras.layers.Flatten(), keras.layers.Dense(10)]
    return [kquant.QuantDepthwiseConv2D(3, depth_multiplier=2, kernel_quantizer=kq,
                                        input_quantizer=iq),
            keras.layers.Flatten(), keras.layers.Dense(10)]


def build_model(kind, style, kq, iq):
    layers = _quant_layer(kind, kq, iq)
    if style == "sequential":
        return keras.Sequential([keras.Input((8, 8, 1)), *layers])
    if style == "functional":
        inputs = keras.Input((8, 8, 1))
        x = inputs
        for layer in layers:
            x = layer(x)
        return keras.Model(inputs, x)
    inner = keras.Sequential([keras.Input((8, 8, 1)), *layers[:-1]])
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Rescaling(1.0)(inputs)
    return keras.Model(inputs, layers[-1](inner(x)))


def _data(n=32):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 8, 8, 1)).astype("float32"), rng.integers(0, 10, n)


def _train(model, steps=2):
    """A few real optimizer steps (compiled: only where the test needs training)."""
    x, y = _data()
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, batch_size=len(x) // steps, verbose=0)
    return x


def _move_off_init(model):
    """Cheap stand-in for training: one eager training-mode call (steps initialised from
    data, batch-norm statistics updated), then every trainable variable moved by noise,
    so a variable restored to the wrong place changes the predictions."""
    x, _ = _data()
    model(x, training=True)
    rng = np.random.default_rng(7)
    for v in model.trainable_variables:
        value = ops.convert_to_numpy(v)
        v.assign(value + (0.01 * rng.standard_normal(value.shape)).astype(value.dtype))
    return x


def _assert_same_predictions(model, inference, x):
    expected = ops.convert_to_numpy(model(x, training=False))
    got = ops.convert_to_numpy(inference(x, training=False))
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


FAST_CASES = {"sign-clipped_ste-dense-sequential", "uniform3-dsq_stateful-conv2d-sequential",
              "dorefa2-ewgs-conv2d-functional", "bwn_tensor-mad-conv1d-nested"}


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=() if c in FAST_CASES else pytest.mark.slow) for c in sorted(CASES)])
def test_round_trip_is_bit_identical(case, tmp_path):
    kq, iq, kind, style = CASES[case]
    model = build_model(kind, style, kq(), iq() if iq else None)
    x = _move_off_init(model)
    path = tmp_path / "m.npz"
    rows = deploy.export_weights(model, path)
    (row,) = rows
    assert row["packed_bytes"] == deploy.packed_size(row["weights"], row["bits"])
    inference = deploy.load_inference_model(path)
    _assert_same_predictions(model, inference, x)
    # the stored kernel is a function of its codes: decoded levels == the forward kernel
    layer = next(l for l in kquant.callbacks.quantized_layers(model) if l.kernel_quantizer)
    twin = next(l for l in kquant.callbacks.quantized_layers(inference))
    assert twin.kernel_quantizer is None
    np.testing.assert_array_equal(ops.convert_to_numpy(twin.kernel),
                                  ops.convert_to_numpy(layer.quantized_kernel(training=False)))
    (info,) = deploy.inspect_export(path)
    assert info["distinct_codes"] <= 2 ** info["bits"]


def test_two_models_in_one_process_load_by_structure_not_names(tmp_path):
    """Stateful estimators get auto-numbered names (dsq_1, ...); paths do not depend on them."""
    make = lambda: build_model("dense", "sequential", _q("dorefa", "dsq", bits=2),  # noqa: E731
                               _q("uniform", "dsq", bits=4))
    first, second = make(), make()
    x = _train(second)
    deploy.export_weights(second, tmp_path / "a.npz")
    _assert_same_predictions(second, deploy.load_inference_model(tmp_path / "a.npz"), x)
    assert first.layers[-1].input_quantizer.estimator.name != \
        second.layers[-1].input_quantizer.estimator.name


def test_kquant_deploy_is_importable_from_the_package():
    assert kquant.deploy.load_inference_model is deploy.load_inference_model


# -- tampering -------------------------------------------------------------------
def _manifest(data):
    return json.loads(data["manifest"].tobytes().decode())


def _with_manifest(arrays, manifest):
    arrays["manifest"] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)


def _tamper_manifest(fn):
    def apply(arrays, key):
        m = _manifest(arrays)
        fn(m, key)
        _with_manifest(arrays, m)
    return apply


def _entry(m, key):
    return next(e for e in m["entries"] if e["path"] == key)


def _set(arrays, name, value):
    arrays[name] = value


TAMPER = {
    # name: (apply(arrays, kernel_path), text the error must contain)
    "codes_missing": (lambda a, k: a.pop(f"{k}:codes"), "{k}:codes"),
    "levels_missing": (lambda a, k: a.pop(f"{k}:levels"), "{k}:levels"),
    "scale_missing": (lambda a, k: a.pop(f"{k}:param:scale"), "{k}:param:scale"),
    "float_missing": (lambda a, k: a.pop("3/bias:value"), "3/bias:value"),
    "extra_array": (lambda a, k: _set(a, "9/extra:value", np.zeros(3, np.float32)), "9/extra:value"),
    "manifest_missing": (lambda a, k: a.pop("manifest"), "manifest"),
    "manifest_not_json": (lambda a, k: _set(a, "manifest", np.frombuffer(b"{oops", np.uint8)),
                          "manifest"),
    "version_mismatch": (_tamper_manifest(lambda m, k: m.update(version=1)), "version 1"),
    "format_mismatch": (_tamper_manifest(lambda m, k: m.update(format="other")), "format"),
    "bits_changed": (_tamper_manifest(lambda m, k: _entry(m, k).update(bits=2)), "bits 2 disagree"),
    "bits_changed_with_codes": (
        lambda a, k: (_tamper_manifest(lambda m, kk: _entry(m, kk).update(bits=2))(a, k),
                      _set(a, f"{k}:codes", np.concatenate([a[f"{k}:codes"]] * 2)),
                      _set(a, f"{k}:levels", np.zeros((1, 4), np.float32))), "{k}:"),
    "codes_truncated": (lambda a, k: _set(a, f"{k}:codes", a[f"{k}:codes"][:-1]), "{k}:codes"),
    "codes_truncated_zero_padded": (
        lambda a, k: _set(a, f"{k}:codes", np.concatenate([a[f"{k}:codes"][:-2],
                                                             np.zeros(2, np.uint8)])), "{k}:codes"),
    "codes_bit_flipped": (lambda a, k: _set(a, f"{k}:codes", a[f"{k}:codes"] ^ np.uint8(1)),
                          "{k}:codes"),
    "codes_wrong_dtype": (lambda a, k: _set(a, f"{k}:codes", a[f"{k}:codes"].astype(np.int64)),
                          "{k}:codes"),
    "scale_nan": (lambda a, k: _set(a, f"{k}:param:scale", a[f"{k}:param:scale"] * np.nan),
                  "{k}:param:scale"),
    "scale_changed": (lambda a, k: _set(a, f"{k}:param:scale", a[f"{k}:param:scale"] * 2),
                      "{k}:levels"),
    "levels_nan": (lambda a, k: _set(a, f"{k}:levels", a[f"{k}:levels"] * np.nan), "{k}:levels"),
    "levels_wrong_shape": (lambda a, k: _set(a, f"{k}:levels", a[f"{k}:levels"][:, :1]),
                           "{k}:levels"),
    "quantizer_swapped": (_tamper_manifest(lambda m, k: _entry(m, k).update(
        quantizer={"name": "sign", "estimator": "ste"}, params={})), "{k}:"),
    "quantizer_swapped_levels": (_tamper_manifest(lambda m, k: _entry(m, "3/kernel").update(
        quantizer={"name": "uniform", "config": {"bits": 2, "step": 0.5}})), "3/kernel:levels"),
    "quantizer_unknown": (_tamper_manifest(lambda m, k: _entry(m, k).update(
        quantizer={"name": "no_such_quantizer"})), "{k}:codes"),
    "float_wrong_shape": (lambda a, k: _set(a, "3/bias:value", np.zeros(7, np.float32)),
                          "3/bias:value"),
    "float_nan": (lambda a, k: _set(a, "3/bias:value", a["3/bias:value"] * np.nan), "3/bias:value"),
    "float_value_changed": (lambda a, k: _set(a, "3/bias:value", a["3/bias:value"] + 1),
                            "3/bias:value"),
    "checksum_removed": (_tamper_manifest(lambda m, k: m["sha256"].pop(f"{k}:codes")), "{k}:codes"),
    "config_units_changed": (_tamper_manifest(
        lambda m, k: m["model_config"]["config"]["layers"][-1]["config"].update(units=7)),
        "3/"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        kquant.QuantConv2D(4, 3, kernel_quantizer=kquant.quantizer("bwn", per_channel=True)),
        keras.layers.ReLU(), keras.layers.Flatten(),
        kquant.QuantDense(10, kernel_quantizer=kquant.quantizer("dorefa", bits=2))])
    path = tmp_path_factory.mktemp("deploy") / "clean.npz"
    deploy.export_weights(model, path)
    with np.load(path) as data:
        return path, {k: data[k] for k in data.files}, model


def test_clean_file_loads_with_identical_predictions(exported):
    path, _, model = exported
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype("float32")
    loaded = deploy.load_inference_model(path)
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded(x, training=False)),
                                  ops.convert_to_numpy(model(x, training=False)))


@pytest.mark.parametrize("name", sorted(TAMPER))
def test_tampered_file_gives_a_clear_error(name, exported, tmp_path):
    _, clean, _ = exported
    arrays = {k: v.copy() for k, v in clean.items()}
    apply, expected = TAMPER[name]
    apply(arrays, "0/kernel")
    path = tmp_path / "bad.npz"
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(deploy.DeployFormatError) as err:
        deploy.load_inference_model(path)
    assert expected.format(k="0/kernel") in str(err.value)


def test_not_an_npz_file(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(deploy.DeployFormatError, match="not a kquant deploy file"):
        deploy.load_inference_model(path)


# -- batch-norm folding ------------------------------------------------------------
@pytest.mark.parametrize("style", ["sequential", pytest.param("functional", marks=pytest.mark.slow),
                                   pytest.param("nested", marks=pytest.mark.slow)])
def test_batch_norm_folding_equals_the_unfolded_model(style, tmp_path):
    model = build_model("conv2d", style, _q("bwn", "ste", per_channel=True), _q("sign", "ste"))
    x = _train(model, steps=4) if style == "sequential" else _move_off_init(model)
    bn = next(l for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization))
    assert np.abs(ops.convert_to_numpy(bn.moving_mean)).max() > 0  # trained statistics
    deploy.export_weights(model, tmp_path / "plain.npz")
    deploy.export_weights(model, tmp_path / "folded.npz", fold_batch_norm=True)
    folded = deploy.load_inference_model(tmp_path / "folded.npz")
    assert not any(isinstance(l, keras.layers.BatchNormalization)
                   for l in folded._flatten_layers())
    expected = ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(ops.convert_to_numpy(folded(x, training=False)), expected,
                               rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    with np.load(tmp_path / "plain.npz") as a, np.load(tmp_path / "folded.npz") as b:
        key = next(k for k in a.files if k.endswith("kernel:codes"))
        np.testing.assert_array_equal(a[key], b[key])  # same codes, scaled levels
        assert b[key.replace("codes", "levels")].shape[0] == 6
    # the folded file is validated like any other: a changed fold scale is caught
    with np.load(tmp_path / "folded.npz") as data:
        arrays = {k: data[k] for k in data.files}
    key = key.replace("codes", "fold_scale")
    arrays[key] = arrays[key] * 2
    with open(tmp_path / "bad.npz", "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(deploy.DeployFormatError, match="levels"):
        deploy.load_inference_model(tmp_path / "bad.npz")


def test_mixed_precision_model_round_trips_bit_identically(tmp_path):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build_model("conv2d", "functional", _q("dorefa", "ste", bits=2),
                            _q("uniform", "ste", bits=4, symmetric=False))
        x = _move_off_init(model)
        deploy.export_weights(model, tmp_path / "m.npz")
        inference = deploy.load_inference_model(tmp_path / "m.npz")
        assert inference.layers[1].compute_dtype == "float16"
        _assert_same_predictions_any_dtype(model, inference, x)
    finally:
        keras.config.set_dtype_policy(previous)


def _assert_same_predictions_any_dtype(model, inference, x):
    np.testing.assert_array_equal(ops.convert_to_numpy(inference(x, training=False)),
                                  ops.convert_to_numpy(model(x, training=False)))


def test_saved_and_reloaded_model_exports_the_same_file(tmp_path):
    model = build_model("conv2d", "nested", _q("bwn", "ste", per_channel=True),
                        _q("uniform", "dsq", bits=4))
    x = _move_off_init(model)
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    deploy.export_weights(model, tmp_path / "a.npz")
    deploy.export_weights(reloaded, tmp_path / "b.npz")
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            if k != "manifest":
                np.testing.assert_array_equal(a[k], b[k])
    _assert_same_predictions(model, deploy.load_inference_model(tmp_path / "b.npz"), x)
