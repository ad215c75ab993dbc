"""Export of models trained under 2 replicas (MirroredStrategy on 2 logical CPUs) and
under ``jit_compile=True``: export → load is bit-identical, with and without the
BatchNorm / threshold fold, for a binary convnet and an ALQ model."""

import keras
import numpy as np
import pytest
from keras import ops

from kquant.testing import json_result, run_replicated

BACKEND = keras.backend.backend()
pytestmark = pytest.mark.core

# Trains both models (under REPLICAS() in the subprocess, or plainly in process), exports
# them, reloads them and reports whether every prediction is bit-identical.
_SCRIPT = r"""
import json, os, tempfile
import numpy as np, keras, kquant
from kquant import deploy
from kquant.alq import ALQDense
from kquant.deploy.folding import BinaryThreshold
from kquant.optimizers import ALQ

def binary_convnet():
    sign = lambda: kquant.quantizer("sign", estimator="ste")
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        kquant.QuantConv2D(8, 3, padding="same", kernel_quantizer=sign(), input_quantizer=sign()),
        keras.layers.BatchNormalization(),
        kquant.QuantConv2D(8, 3, kernel_quantizer=sign(), input_quantizer=sign()),
        keras.layers.BatchNormalization(),
        keras.layers.Flatten(),
        kquant.QuantDense(4, kernel_quantizer=sign(), input_quantizer=sign()),
    ])

def alq_model():
    return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                             ALQDense(16, max_bits=2, group=16), keras.layers.ReLU(),
                             ALQDense(4, max_bits=2, group=16)])

def check(make, optimizer, folds, jit):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 4, 64)
    keras.utils.set_random_seed(3)
    with REPLICAS():
        model = make()
        model.compile(optimizer(), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=jit)
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    expected = np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))
    out = {}
    folder = tempfile.mkdtemp()
    for fold in folds:
        path = os.path.join(folder, f"m{fold}.npz")
        deploy.export_weights(model, path, fold_batch_norm=fold)
        loaded = deploy.load_inference_model(path)
        got = np.asarray(keras.ops.convert_to_numpy(loaded(x, training=False)))
        out[f"fold={fold}"] = bool(np.array_equal(got.view(np.uint32), expected.view(np.uint32)))
        out[f"thresholds={fold}"] = sum(isinstance(l, BinaryThreshold) for l in loaded.layers)
    return out

def run(jit):
    adam = lambda: keras.optimizers.Adam(1e-2)
    return {"binary": check(binary_convnet, adam, (False, True), jit),
            "alq": check(alq_model, lambda: ALQ(1e-2), (False,), jit)}
"""


def _assert_exported_bit_identically(result):
    assert result["binary"] == {"fold=False": True, "thresholds=False": 0,
                                "fold=True": True, "thresholds=True": 2}
    assert result["alq"] == {"fold=False": True, "thresholds=False": 0}


@pytest.mark.tf_only
@pytest.mark.slow
def test_export_after_mirrored_training_is_bit_identical():
    proc = run_replicated(_SCRIPT + """
assert NREP == 2
print("JSON" + json.dumps(run(jit=False)))
""", "mirrored")
    _assert_exported_bit_identically(json_result(proc))


@pytest.mark.slow
@pytest.mark.skipif(BACKEND == "torch", reason="torch's jit_compile is torch.compile, not XLA")
def test_export_after_jit_compiled_training_is_bit_identical():
    namespace = {}
    exec(_SCRIPT, namespace)  # noqa: S102 - the same code as the replicated test, in process
    namespace["REPLICAS"] = __import__("contextlib").nullcontext
    _assert_exported_bit_identically(namespace["run"](jit=True))


def test_binary_threshold_layer_reference():
    """BinaryThreshold on its own: ``high`` where ``d·x ≥ d·s·τ`` else ``low``."""
    from kquant.deploy.folding import BinaryThreshold

    layer = BinaryThreshold(-1.0, 1.0, input_scale=0.5)
    layer.build((None, 3))
    layer.thresholds.assign(np.array([2, -1, 7], np.int32))
    layer.directions.assign(np.array([1, -1, 1], np.int8))
    x = np.array([[1.0, -0.5, 3.5], [0.5, -1.0, 3.0]], np.float32)
    got = ops.convert_to_numpy(layer(x))
    np.testing.assert_array_equal(got, [[1.0, 1.0, 1.0], [-1.0, 1.0, -1.0]])
