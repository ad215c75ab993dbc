"""Backend seam for random noise that a compiled function can draw itself.

:func:`uniform_source` splits a draw into a *source* tensor, taken now (it
advances the :class:`keras.random.SeedGenerator`, so it works under
``jit_compile``, on every backend and under distribution strategies), and a
pure function that turns the source into the noise, to run inside a fused,
compiled half (:func:`kquant.xla.compiled_in_graph`) where XLA generates the
values in the loop that uses them.

TensorFlow: the source is the stateless seed ``(k₀, k₁)`` and the noise a
counter-based draw in plain integer ops (:func:`counter_uniform`): element
``i`` (its flat index) gets the 32 bits ``h = H(i ⊕ κ)``, ``κ = H(H(k₀) ⊕
H(k₁ ⊕ φ))``, ``H`` the *lowbias32* integer hash (C. Wellons, hash-prospector:
two xorshift-multiply rounds, a bijection of 32-bit words with full avalanche),
``φ = 0x9E3779B9``, and ``u = lo + (hi − lo)·⌊h/2⁸⌋·2⁻²⁴`` (24 bits: exact in
float32). XLA fuses it into the loop that uses ``u``, so nothing is
materialised, and the same values come eagerly, in a graph and under XLA.
TensorFlow's own generators are not fusable: a 2048×2048 draw under XLA:CPU
took 1.87 s with ``auto_select``, 16 ms with Philox, 9.9 ms with ThreeFry (TF
2.21, 2 cores). A stochastic-sign Dense 2048 train step with ThreeFry was 1.34×
its float twin; with this hash 1.07× (sign's 1.07×); hashing twice (``H(H(i ⊕
a) ⊕ b)``) 1.22×: the draw is bound by its integer multiplies.
JAX: the same counter hash in ``jax.numpy`` (uint32 arithmetic wraps), keyed on the
generator's uint32 pair. ``keras.random.uniform`` there is ThreeFry drawn as the
source, outside the quantizer's fused half, so the whole 2048×2048 tensor was
written out and read back: a stochastic-sign Dense 2048 step measured 3.3× its float
twin on 2 CPU cores (JAX 0.10); with the hash fused into its consumer, as on
TensorFlow, about sign's 1.07×. Torch (no XLA): the source is ``keras.random.uniform``'s
draw itself.
"""

from __future__ import annotations

import math

import keras

#: lowbias32's multipliers (Wellons, hash-prospector) and the golden-ratio word
LOWBIAS32 = (0x7FEB352D, 0x846CA68B)
GOLDEN = 0x9E3779B9


def uniform_source(shape, minval, maxval, dtype, seed_generator):
    """``(source, sample)``: ``sample(source)`` is ``U[minval, maxval)`` noise of ``shape``."""
    backend = keras.backend.backend()
    if backend == "jax":
        return seed_generator.next(), lambda source: counter_uniform(shape, source, minval,
                                                                     maxval, dtype)
    if backend != "tensorflow":
        noise = keras.random.uniform(shape, minval=minval, maxval=maxval, dtype=dtype,
                                     seed=seed_generator)
        return noise, lambda source: source
    import tensorflow as tf

    seed = seed_generator.next()
    if seed.dtype != tf.int32:  # the hash keys on the pair's two 32-bit words
        seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
    return seed, lambda source: counter_uniform(shape, source, minval, maxval, dtype)


def counter_uniform(shape, seed, minval, maxval, dtype):
    """``U[minval, maxval)`` of ``shape`` from the 32-bit pair ``seed`` (int32 or uint32
    words) by the counter hash of the module docstring (a pure function of ``seed`` and
    the index; the same values on TensorFlow and JAX for the same words)."""
    if keras.backend.backend() == "jax":
        import jax.numpy as jnp
        from jax import lax

        seed = jnp.asarray(seed)
        key = seed if seed.dtype == jnp.uint32 else \
            lax.bitcast_convert_type(seed.astype(jnp.int32), jnp.uint32)
        shape = tuple(int(d) for d in shape)
        index = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
        unit = _counter_unit(index, key, jnp.bitwise_xor, lambda x, n: x >> n, jnp.uint32,
                             lambda x: x.astype(jnp.float32))
        return (minval + (maxval - minval) * unit).astype(dtype)
    import tensorflow as tf

    def word(value):
        return tf.constant(value, tf.uint32)

    key = tf.bitcast(tf.cast(seed, tf.int32), tf.uint32)
    shape = tf.convert_to_tensor(shape, tf.int32)
    index = tf.bitcast(tf.reshape(tf.range(tf.reduce_prod(shape)), shape), tf.uint32)
    unit = _counter_unit(index, key, tf.bitwise.bitwise_xor,
                         lambda x, n: tf.bitwise.right_shift(x, word(n)), word,
                         lambda x: tf.cast(x, tf.float32))
    return tf.cast(minval + (maxval - minval) * unit, dtype)


def _counter_unit(index, key, xor, shift, word, to_float):
    """``⌊H(i ⊕ κ)/2⁸⌋·2⁻²⁴ ∈ [0, 1)`` on uint32 words, from a backend's ``xor``, right
    ``shift``, uint32 constant ``word`` and float32 cast (the one formula both share)."""
    def mix(x):  # lowbias32
        x = xor(x, shift(x, 16)) * word(LOWBIAS32[0])
        x = xor(x, shift(x, 15)) * word(LOWBIAS32[1])
        return xor(x, shift(x, 16))

    kappa = mix(xor(mix(key[0]), mix(xor(key[1], word(GOLDEN)))))
    return to_float(shift(mix(xor(index, kappa)), 8)) * (2.0 ** -24)
