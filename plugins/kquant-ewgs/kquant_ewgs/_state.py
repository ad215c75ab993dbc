"""Data-initialised state of the EWGS quantizer and layers: one rule, one seam.

* **Global statistics** — :func:`replica_mean` is the one backend-specific
  seam: under ``tf.distribute`` (replica context) it all-reduces a per-replica
  mean across replicas, so that an initialisation sees the statistics of the
  *global* batch, not replica 0's slice (equal per-replica batches, as
  ``MirroredStrategy`` splits them). On JAX ``DataParallel`` the batch is one
  global array, so a mean is already global; on one device it is the identity.
* **Write once, finite, training only, with the step** — :func:`init_once`:
  the stored value is written the first time a *training* step that the
  optimizer applies sees a finite estimate; until then every call uses the
  estimate from its own data without storing it. The write goes through
  :mod:`kquant.step_state` (the variables are step statistics, assigned by the
  optimizer inside its apply): a step the optimizer skips (``SkipNonFinite``,
  a loss-scale overflow) leaves the state as it was even when this layer's
  input was finite (a NaN pixel that an upstream ReLU mapped to 0, a NaN
  label), and so does an inference call.
"""

from __future__ import annotations

import keras
from keras import ops

from kquant import distribute, step_state


def replica_mean(x):
    """Mean of ``x`` over replicas (TF replica context), else ``x`` unchanged."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
            ctx = tf.distribute.get_replica_context()
            if ctx is not None and ctx.num_replicas_in_sync > 1:
                return ctx.all_reduce(tf.distribute.ReduceOp.MEAN, x)
    return x


def add_state(layer, name, initializer="zeros"):
    """A scalar float32 step statistic of ``layer`` (written only by :func:`init_once`)."""
    return step_state.add_statistic(layer, name, (), initializer)


def init_once(variables, moments, num_moments, finish, initialized, training):
    """Values for ``variables`` under the write-once rule, and the commit.

    ``moments()`` gives this replica's ``num_moments`` batch statistics
    (scalars), evaluated only while not yet initialised
    (:func:`kquant.distribute.unless`); they are then averaged across replicas by
    :func:`replica_mean` (outside that branch: a collective may not sit in one) and ``finish(moments)``
    turns them into the estimates. Returns ``(values, commit)``: the tensors to
    use now (the stored values once initialised, else the estimates; no
    gradient flows into them) and ``commit(outputs)``, the identity on a
    tensor of the caller's output path that hands the optimizer the new state
    (:func:`kquant.step_state.initialize_once`; call it once per step). The variables
    (and ``initialized``) change only when ``training`` is true, not yet
    initialised, every estimate is finite and the optimizer applies the step.
    """
    local = distribute.unless(step_state.is_initialized(initialized),
                              lambda: [ops.cast(m, "float32") for m in moments()],
                              [ops.zeros((), "float32") for _ in range(num_moments)])
    reduced = [replica_mean(m) for m in local]
    estimates = [ops.cast(e, v.dtype) for v, e in zip(variables, finish(reduced))]
    return step_state.initialize_once(initialized, list(zip(variables, estimates)),
                                      training=bool(training))
