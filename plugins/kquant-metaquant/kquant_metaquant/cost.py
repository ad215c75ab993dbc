"""The meta network's own share of a MetaQuant step: a floor for its cost.

One step evaluates ``M_φ`` on every meta-quantized coordinate and takes ``∂ℓ/∂φ``
through it. :func:`meta_network_seconds` times just that, XLA-compiled, on ``n``
random coordinates: for LSTMFC the products ``h_prev·W_hh`` and ``h_prevᵀ·δgates``
(``[n, h]·[h, 4h]``, ``8h²`` multiply-adds per coordinate) and the ``[n, 4h]``
element-wise passes between them. A step of the quantized model costs at least its
STE step plus this. :func:`products_seconds` times LSTMFC's two products alone: no
implementation of its step in float32 on that machine costs less than the STE step
plus them.
"""

from __future__ import annotations

import time

import keras
import numpy as np
from keras import ops

from kquant_metaquant._backend import backend_value_and_grad, xla


def _check_size(n):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be a positive integer, got {n!r}.")


def _median_seconds(run, repeats):
    """Median wall time of ``run()`` over ``repeats`` calls after one that compiles and
    warms the caches."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def meta_network_seconds(network, n, repeats=20, seed=0):
    """Median seconds of ``M_φ``'s forward and ``∂/∂φ`` (XLA) on ``n`` coordinates."""
    _check_size(n)
    rng = np.random.default_rng(seed)
    grad, soft, up = (ops.convert_to_tensor(rng.normal(size=n).astype("float32")) for _ in range(3))
    state = tuple(ops.convert_to_tensor(0.1 * rng.normal(size=(n, network.state_width))
                                        .astype("float32")) for _ in range(network.state_count))
    weights = list(network.trainable_weights)

    def loss(values):
        with keras.StatelessScope(state_mapping=list(zip(weights, values))):
            m, new_state = network.meta_gradient(grad, soft, state)
        return ops.sum(m * up), new_state

    def value_and_grads(values):
        (value, _), grads = backend_value_and_grad(loss, [values])
        return value + sum(ops.sum(g) for g in grads[0])   # one scalar that waits for all

    step = xla(value_and_grads)
    values = [ops.convert_to_tensor(w) for w in weights]

    def run():
        return float(ops.convert_to_numpy(step(values)))

    return _median_seconds(run, repeats)


def products_seconds(network, n, repeats=20, seed=0):
    """Median seconds of a recurrent meta network's two ``[n, h]·[h, 4h]`` products
    alone: the forward ``h_prev·W_hh`` and ``∂W_hh = h_prevᵀ·δgates`` (``2·n·h·4h``
    multiply-adds), the fastest of three ways to compute them on this machine: XLA,
    the backend's own matmul, NumPy's BLAS. ``None`` for a network without a
    recurrent state (FCGrad, MultiFC: O(n·h) work, no such product)."""
    _check_size(n)
    if not network.state_count:
        return None
    h = network.hidden
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=shape).astype("float32")
              for shape in ((n, h), (h, 4 * h), (n, 4 * h))]
    tensors = [ops.convert_to_tensor(a) for a in arrays]

    def products(h_prev, w_hh, d_gates):   # both outputs whole: nothing for XLA to drop
        return ops.matmul(h_prev, w_hh), ops.matmul(ops.transpose(h_prev), d_gates)

    compiled = xla(products)
    ways = {   # each waits for its result: the small output of one executable or op chain
        "xla": lambda: ops.convert_to_numpy(compiled(*tensors)[1]),
        "backend": lambda: ops.convert_to_numpy(products(*tensors)[1]),
        "numpy": lambda: (arrays[0] @ arrays[1], arrays[0].T @ arrays[2]),
    }
    return min(_median_seconds(run, repeats) for run in ways.values())
