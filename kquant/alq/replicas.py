"""Cross-replica reductions for statistics computed in a forward pass (one backend seam).

Under ``tf.distribute`` each replica's forward pass sees only its slice of the
global batch, so a data-dependent statistic must be summed over replicas
(as ``SyncBatchNormalization`` does) before it is used. Under JAX
``keras.distribution.DataParallel`` the step is one SPMD program over the
global batch, so the plain reductions are already global; on one device the
reductions are the identity.
"""

from __future__ import annotations

import keras
from keras import ops


def _tf_replica_context():
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def total(x):
    """``x`` summed over replicas."""
    context = _tf_replica_context()
    if context is None:
        return x
    import tensorflow as tf

    return context.all_reduce(tf.distribute.ReduceOp.SUM, x)


def minimum(x):
    """Element-wise minimum of ``x`` over replicas."""
    context = _tf_replica_context()
    if context is None:
        return x
    return ops.min(context.all_gather(ops.expand_dims(x, 0), axis=0), axis=0)


def maximum(x):
    """Element-wise maximum of ``x`` over replicas."""
    return -minimum(-x)
