"""The shared meta networks ``M_φ`` of MetaQuant (Chen et al. 2019, §4.3).

Each is coordinate-wise: every weight is one sample of a batch of size 1
features, so one network serves all layers whatever their shapes. Inputs are
flat ``(n,)`` vectors of ``g_Ŵ`` (the loss gradient w.r.t. the quantized
weight) and ``W̃`` (the pre-processed weight); the output is ``g_W̃``.

* FCGrad  (Eq. 9):  ``M(g) = FCs(g)``
* MultiFC (Eq. 10): ``M(g, W̃) = g · FCs(W̃)``
* LSTMFC  (Eq. 11): ``M(g, W̃) = g · FC(LSTM(W̃))`` with a per-coordinate
  LSTM state ``(h, c)`` of shape ``(n, hidden)`` carried between steps (and
  treated as a constant, as in the authors' code).

Paper defaults: hidden size 100, two bias-free FC layers, no nonlinearity,
random initialisation.

A bias-free linear stack is a scalar: ``FCs(x) = c·x`` with ``c = Π kernels``,
whose sign at initialisation is a coin flip (glorot here, PyTorch's default in
the authors' code). FCGrad then starts as ``g_W̃ = c·g``: with ``c < 0`` every
kernel moves *up* the loss until the meta optimizer flips ``c`` (digits,
DoReFa-1 + SGD: 0.22 test accuracy against STE's 0.85 when the seed drew
``c = −0.34``). ``init="identity"`` is the authors' ``symmetric_init``
(first kernel ``1/hidden``, then identities, last kernel ones): the stack
starts as ``x ↦ x``, so FCGrad starts as STE (``M(g) = g``); ``MetaQuant``
warns when a random draw starts uphill.

For MultiFC the bias-free linear stack makes ``FCs(W̃) = c·W̃``, so MultiFC collapses to ``g_W̃ = c·g·W̃``. With a *signed* ``W̃`` (BWN, sign:
``W̃ = W``) every coordinate with ``sign(c·W) < 0`` moves *up* the loss, about
half of them every step (the paper's own configuration; MetaQuant warns).
``use_bias=True`` (our fix) gives the FC layers biases; MultiFC's last one is
initialised to 1, so ``FCs(W̃) = c·W̃ + b`` starts near 1 (``M ≈ g``, STE) and
φ learns a positive, ``W̃``-dependent scale. FCGrad's biases all start at 0
(``M(0) = 0``: no gradient offset).
"""

from __future__ import annotations

import keras
from keras import ops

from kquant.xla import in_xla

_ACTIVATIONS = (None, "relu", "tanh")
_INITS = ("random", "identity")


def _check(hidden, num_layers, activation, use_bias=False, init="random"):
    if init not in _INITS:
        raise ValueError(f"`init` must be one of {_INITS}, got {init!r}.")
    if not isinstance(use_bias, bool):
        raise ValueError(f"`use_bias` must be a bool, got {use_bias!r}.")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"`hidden` must be a positive integer, got {hidden!r}.")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"`num_layers` must be a positive integer, got {num_layers!r}.")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {_ACTIVATIONS}, got {activation!r}.")


class MetaNetwork(keras.layers.Layer):
    """Base: ``meta_gradient(g, W̃, state) -> (g_W̃, new_state)`` on flat vectors."""

    #: number of per-coordinate state tensors, each ``(n, state_width)``
    state_count = 0
    #: initial value of the FC stack's last bias (``use_bias=True``)
    output_bias_init = "zeros"
    #: whether ``MetaQuant.compile(jit_compile="auto")`` compiles the step with XLA
    #: on TensorFlow: only where the network's own work gains more from XLA's
    #: fusion than the model's layers lose to XLA:CPU's kernels (LSTMFC)
    prefers_xla = False

    def __init__(self, hidden=100, num_layers=2, activation=None, use_bias=False, init="random",
                 **kwargs):
        super().__init__(**kwargs)
        _check(hidden, num_layers, activation, use_bias, init)
        self.hidden = hidden
        self.num_layers = num_layers
        self.activation = activation
        self.use_bias = use_bias
        self.init = init

    @property
    def state_width(self):
        return self.hidden

    def _kernel_init(self, i, shape):
        """glorot (``init="random"``) or the identity stack: ``1/hidden``, identities, ones."""
        if self.init == "random":
            return "glorot_uniform"
        if i == 0 and shape[1] > 1:
            return keras.initializers.Constant(1.0 / shape[1])
        if shape[0] == shape[1]:
            return "identity"
        return "ones"

    def _fc_stack(self, prefix):
        """``1 → hidden → … → 1`` kernels (``num_layers`` of them); with ``use_bias``
        also biases (zeros, the last one :attr:`output_bias_init`), else bias-free as
        in the paper."""
        sizes = [1] + [self.hidden] * (self.num_layers - 1) + [1]
        kernels = [
            self.add_weight(shape=(a, b), initializer=self._kernel_init(i, (a, b)),
                            name=f"{prefix}{i}")
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
        ]
        self._fc_biases = []
        if self.use_bias:
            last = len(sizes) - 2
            self._fc_biases = [
                self.add_weight(shape=(b,), initializer=self.output_bias_init if i == last else "zeros",
                                name=f"{prefix}_bias{i}")
                for i, b in enumerate(sizes[1:])
            ]
        return kernels

    def _apply_fc(self, kernels, x):
        """``x`` of shape ``(n, 1)`` through the stack, activation between layers.

        Without activation the stack is the scalar affine map ``c·x + d``
        (``c = Π kernels``; ``d`` the biases pushed through, 0 without biases):
        computed as such (O(n), identical maths) instead of ``n × hidden`` matmuls.
        """
        if self.activation is None:
            c = kernels[0]
            d = self._fc_biases[0][None, :] if self._fc_biases else None
            for i, k in enumerate(kernels[1:], start=1):
                c = ops.matmul(c, k)
                if d is not None:
                    d = ops.matmul(d, k) + self._fc_biases[i]
            return x * c if d is None else x * c + d
        for i, k in enumerate(kernels):
            x = ops.matmul(x, k)
            if self._fc_biases:
                x = x + self._fc_biases[i]
            if i < len(kernels) - 1 and self.activation is not None:
                x = ops.relu(x) if self.activation == "relu" else ops.tanh(x)
        return x

    @property
    def collapses_to_scalar(self) -> bool:
        """``True`` when the FC stack is linear and bias-free: ``FCs(x) = c·x``."""
        return self.activation is None and not self.use_bias

    def linear_scale(self):
        """``c = Π kernels`` of a linear FC stack (``FCs(x) = c·x + d``), as a float;
        ``None`` for a stack with an activation or a network without one."""
        kernels = getattr(self, "fc", None)
        if self.activation is not None or not kernels:
            return None
        c = kernels[0]
        for k in kernels[1:]:
            c = ops.matmul(c, k)
        return float(ops.convert_to_numpy(ops.reshape(c, ())))

    def initial_state(self, n):
        return tuple(ops.zeros((n, self.state_width)) for _ in range(self.state_count))

    def meta_gradient(self, grad, soft, state=()):
        raise NotImplementedError

    def call(self, grad, soft):
        return self.meta_gradient(grad, soft, self.initial_state(ops.shape(grad)[0]))[0]

    def get_config(self):
        return {**super().get_config(), "hidden": self.hidden,
                "num_layers": self.num_layers, "activation": self.activation,
                "use_bias": self.use_bias, "init": self.init}


@keras.saving.register_keras_serializable(package="kquant_metaquant")
class FCGradNetwork(MetaNetwork):
    """FCGrad: ``M(g) = FCs(g)`` (bias-free FC layers on the gradient alone)."""

    def build(self, input_shape=None):
        self.fc = self._fc_stack("fc")
        self.built = True

    def meta_gradient(self, grad, soft, state=()):
        grad = ops.convert_to_tensor(grad)
        return self._apply_fc(self.fc, ops.reshape(grad, (-1, 1)))[:, 0], ()


@keras.saving.register_keras_serializable(package="kquant_metaquant")
class MultiFCNetwork(MetaNetwork):
    """MultiFC: ``M(g, W̃) = g · FCs(W̃)``."""

    output_bias_init = "ones"   # M ≈ g at the start (use_bias=True)

    def build(self, input_shape=None):
        self.fc = self._fc_stack("fc")
        self.built = True

    def meta_gradient(self, grad, soft, state=()):
        grad, soft = ops.convert_to_tensor(grad), ops.convert_to_tensor(soft)
        return grad * self._apply_fc(self.fc, ops.reshape(soft, (-1, 1)))[:, 0], ()


@keras.saving.register_keras_serializable(package="kquant_metaquant")
class LSTMFCNetwork(MetaNetwork):
    """LSTMFC: ``M(g, W̃) = g · FC(LSTM(W̃))``, per-coordinate LSTM state ``(h, c)``."""

    state_count = 2
    # [n, 4h] element-wise passes around two [n, h]·[h, 4h] products per step: XLA
    # fuses them (small convnet, 2 CPU cores: 5.3× → 4.2–4.5× an STE step)
    prefers_xla = True
    #: rows per block of :meth:`meta_gradient` under XLA, and the most blocks unrolled
    block_rows = 4096
    max_blocks = 32

    def __init__(self, hidden=100, num_layers=1, activation=None, use_bias=False, init="random",
                 **kwargs):
        # the LSTM and its FC head always have biases (as in the authors' code)
        if init != "random":
            raise ValueError(f"`init` of LSTMFC must be 'random' (an LSTM has no identity "
                             f"initialisation), got {init!r}.")
        super().__init__(hidden=hidden, num_layers=num_layers, activation=activation,
                         use_bias=use_bias, init=init, **kwargs)

    def build(self, input_shape=None):
        h = self.hidden
        self.lstm_kernel = self.add_weight(shape=(1, 4 * h), initializer="glorot_uniform",
                                           name="lstm_kernel")
        self.lstm_recurrent = self.add_weight(shape=(h, 4 * h), initializer="orthogonal",
                                              name="lstm_recurrent_kernel")
        self.lstm_bias = self.add_weight(shape=(4 * h,), initializer="zeros", name="lstm_bias")
        self.fc_kernel = self.add_weight(shape=(h, 1), initializer="glorot_uniform", name="fc_kernel")
        self.fc_bias = self.add_weight(shape=(1,), initializer="zeros", name="fc_bias")
        self.built = True

    def meta_gradient(self, grad, soft, state=()):
        """Under XLA, in row blocks of :attr:`block_rows` (at most :attr:`max_blocks`):
        each block's ``[rows, 4h]`` gates stay in cache between the products and the
        element-wise passes, forward and backward (n = 29 k, h = 100, value and ``∂/∂φ``:
        TF 36 → 30 ms, JAX 61 → 47 ms on 2 CPU cores). Every row is computed alike."""
        h_prev, c_prev = state
        grad, soft = ops.convert_to_tensor(grad), ops.convert_to_tensor(soft)
        n = grad.shape[0]
        if n is None or not in_xla():
            return self._cell(grad, soft, h_prev, c_prev)
        rows = max(self.block_rows, -(-n // self.max_blocks))
        if rows >= n:
            return self._cell(grad, soft, h_prev, c_prev)
        blocks = [self._cell(grad[s:s + rows], soft[s:s + rows], h_prev[s:s + rows],
                             c_prev[s:s + rows]) for s in range(0, n, rows)]
        return (ops.concatenate([b[0] for b in blocks], 0),
                tuple(ops.concatenate([b[1][i] for b in blocks], 0) for i in range(2)))

    def _cell(self, grad, soft, h_prev, c_prev):
        gates = (ops.matmul(ops.reshape(soft, (-1, 1)), self.lstm_kernel)
                 + ops.matmul(h_prev, self.lstm_recurrent) + self.lstm_bias)
        i, f, g, o = ops.split(gates, 4, axis=-1)
        c = ops.sigmoid(f) * c_prev + ops.sigmoid(i) * ops.tanh(g)
        h = ops.sigmoid(o) * ops.tanh(c)
        out = ops.matmul(h, self.fc_kernel)[:, 0] + self.fc_bias[0]
        return grad * out, (h, c)


META_NETWORKS = {"fcgrad": FCGradNetwork, "multifc": MultiFCNetwork, "lstmfc": LSTMFCNetwork}


def build_meta_network(kind, hidden=100, num_layers=None, activation=None, name=None,
                       use_bias=False, init="random"):
    """A built meta network by kind (``fcgrad``, ``multifc``, ``lstmfc``)."""
    if kind not in META_NETWORKS:
        raise ValueError(f"`meta_network` must be one of {sorted(META_NETWORKS)}, got {kind!r}.")
    kwargs = {"hidden": hidden, "activation": activation, "use_bias": use_bias, "init": init}
    if num_layers is not None:
        kwargs["num_layers"] = num_layers
    net = META_NETWORKS[kind](name=name or f"meta_{kind}", **kwargs)
    net.build()
    return net
