"""Data-initialised state of the EWGS quantizer and layers: one rule, one seam.

* **Global statistics** — :func:`replica_mean` is the one backend-specific
  seam: under ``tf.distribute`` (replica context) it all-reduces a per-replica
  mean across replicas, so that an initialisation sees the statistics of the
  *global* batch, not replica 0's slice (equal per-replica batches, as
  ``MirroredStrategy`` splits them). On JAX ``DataParallel`` the batch is one
  global array, so a mean is already global; on one device it is the identity.
* **Write once, finite, training only** — :func:`init_once`: the stored value
  is written the first time a *training* call sees a finite estimate; until
  then every call uses the estimate from its own data without storing it, so
  a non-finite batch (even the first) or an inference call leaves the state
  exactly as it was.
"""

from __future__ import annotations

import keras
from keras import ops


def replica_mean(x):
    """Mean of ``x`` over replicas (TF replica context), else ``x`` unchanged."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
            ctx = tf.distribute.get_replica_context()
            if ctx is not None and ctx.num_replicas_in_sync > 1:
                return ctx.all_reduce(tf.distribute.ReduceOp.MEAN, x)
    return x


def init_once(variables, moments, num_moments, finish, initialized, training):
    """Values for ``variables`` under the write-once rule.

    ``moments()`` gives this replica's ``num_moments`` batch statistics
    (scalars), evaluated only while not yet initialised (inside a ``cond``);
    they are then averaged across replicas by :func:`replica_mean` (outside the
    ``cond``: a collective may not sit in a branch) and ``finish(moments)``
    turns them into the estimates. Returns the tensors to use now: the stored
    values once initialised, else the estimates. The variables (and
    ``initialized``) are written only when ``training`` is true, not yet
    initialised and every estimate is finite.
    """
    done = ops.convert_to_tensor(initialized) > 0
    stored = [ops.convert_to_tensor(v) for v in variables]

    def local():
        return [ops.cast(m, "float32") for m in moments()]

    def skipped():
        return [ops.zeros((), "float32") for _ in range(num_moments)]

    reduced = [replica_mean(m) for m in ops.cond(done, skipped, local)]
    estimates = [ops.cast(e, v.dtype) for v, e in zip(variables, finish(reduced))]
    values = [ops.where(done, old, e) for old, e in zip(stored, estimates)]
    if training:
        finite = ops.all(ops.stack([ops.all(ops.isfinite(v)) for v in values]))
        write = ops.logical_and(ops.logical_not(done), finite)
        for v, value, old in zip(variables, values, stored):
            v.assign(ops.where(write, value, old))
        initialized.assign(ops.where(write, 1.0, ops.convert_to_tensor(initialized)))
    return values
