"""How alike two nets train: alignment error Ē and quantized-weight agreement.

"Custom gradient estimators are STEs in disguise", Eq. 5 and §6.2::

    E = |M(w_Q̂) − w_STE|   (SGD twin, weights re-initialised by M)
    E = |w_Q̂ − w_STE|      (Adam twin, or any pair started from equal weights)

averaged over all quantized weights, each normalised by its layer's
representable range ``Δ·(hi − lo)`` (binary: 2), so 100 % means opposite ends
of the range. Agreement is the share of equal quantized weights (equal codes).
"""

from __future__ import annotations

import keras
import numpy as np


def quantized_layers(model):
    """Layers of ``model`` (recursively) that have a kernel quantizer, in order."""
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(quantized_layers(layer))
        elif getattr(layer, "kernel_quantizer", None) is not None:
            out.append(layer)
    return out


def _pairs(model_a, model_b):
    a, b = quantized_layers(model_a), quantized_layers(model_b)
    if not a:
        raise ValueError("`model_a` has no layer with a kernel quantizer.")
    if len(a) != len(b) or any(tuple(x.latent_kernel.shape) != tuple(y.latent_kernel.shape)
                               for x, y in zip(a, b)):
        raise ValueError("`model_a` and `model_b` must have the same quantized layers "
                         "(same order and kernel shapes).")
    return list(zip(a, b))


def _sync_backend_state(model):
    """JAX's ``fit`` holds variables outside the model between steps; write them back."""
    sync = getattr(model, "jax_state_sync", None)
    if callable(sync):
        sync()


def _kernel(layer):
    return np.asarray(keras.ops.convert_to_numpy(layer.latent_kernel), dtype="float64")


def _reduce(per_layer, counts, per_layer_out):
    total = sum(counts.values())
    value = float(sum(per_layer[k] * counts[k] for k in per_layer) / total)
    return (value, per_layer) if per_layer_out else value


def alignment_error(q_model, ste_model, *, mapped, maps=None, per_layer=False):
    """Normalised alignment error Ē between two nets (a fraction; ×100 for %).

    ``mapped=True``: ``|M(w_q) − w_ste|`` with M of ``q_model``'s kernel
    quantizers (the SGD twin); ``mapped=False``: ``|w_q − w_ste|``. ``maps``
    (layer name → :class:`~kquant.analysis.Equivalence`) skips rebuilding M.
    ``per_layer=True`` also returns ``{layer name: Ē}``.
    """
    from kquant.analysis.equivalence import _quantizer_geometry, equivalence

    per, counts = {}, {}
    for lq, ls in _pairs(q_model, ste_model):
        w_q, w_s = _kernel(lq), _kernel(ls)
        staircase, step, _ = _quantizer_geometry(lq.kernel_quantizer)
        if mapped:
            eq = (maps or {}).get(lq.name) or equivalence(quantizer=lq.kernel_quantizer)
            w_q = eq(w_q)
        span = 2.0 if staircase.binary else step * (staircase.hi - staircase.lo)
        per[lq.name] = float(np.mean(np.abs(w_q - w_s)) / span)
        counts[lq.name] = w_q.size
    return _reduce(per, counts, per_layer)


def weight_agreement(model_a, model_b, *, per_layer=False):
    """Share of quantized weights (codes) that are equal in the two nets."""
    per, counts = {}, {}
    for la, lb in _pairs(model_a, model_b):
        codes_a, _ = la.kernel_quantizer.encode(la.latent_kernel)
        codes_b, _ = lb.kernel_quantizer.encode(lb.latent_kernel)
        per[la.name] = float(np.mean(np.asarray(codes_a) == np.asarray(codes_b)))
        counts[la.name] = np.size(codes_a)
    return _reduce(per, counts, per_layer)


class AlignmentRecorder(keras.callbacks.Callback):
    """Records Ē and agreement of two nets during training (``history``: list of dicts).

    Records at train begin, every ``every`` batches (if given) and at each
    epoch end; each entry has ``step`` (batches done), ``epoch`` (epochs
    completed), ``alignment_error`` (Ē, a fraction) and ``agreement``. Use it with :func:`fit_in_lockstep`, which steps both nets on
    the same batches, or with ``fit`` of one net against a fixed reference.
    """

    def __init__(self, q_model, ste_model, *, mapped, every=None, maps=None):
        super().__init__()
        if every is not None and (isinstance(every, bool) or int(every) < 1):
            raise ValueError(f"`every` must be a positive integer or None, got {every!r}.")
        self.q_model, self.ste_model = q_model, ste_model
        self.mapped = bool(mapped)
        self.every = None if every is None else int(every)
        self.maps = maps
        self.history: list[dict] = []
        self._step = 0
        self._epoch = 0

    def record(self):
        for model in (self.q_model, self.ste_model):
            _sync_backend_state(model)
        if self.mapped and self.maps is None:
            from kquant.analysis.equivalence import equivalence

            self.maps = {l.name: equivalence(quantizer=l.kernel_quantizer)
                         for l in quantized_layers(self.q_model)}
        entry = {
            "step": self._step,
            "epoch": self._epoch,
            "alignment_error": alignment_error(self.q_model, self.ste_model,
                                               mapped=self.mapped, maps=self.maps),
            "agreement": weight_agreement(self.q_model, self.ste_model),
        }
        self.history.append(entry)
        return entry

    def on_train_begin(self, logs=None):
        if not self.history:
            self.record()

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self.every is not None and self._step % self.every == 0:
            self.record()

    def on_epoch_end(self, epoch, logs=None):
        self._epoch = epoch + 1  # completed epochs
        if self.history and self.history[-1]["step"] == self._step:
            self.history[-1]["epoch"] = self._epoch
        else:
            self.record()


def fit_in_lockstep(models, x, y, *, epochs, batch_size, seed=0, callbacks=()):
    """Train compiled ``models`` on the same shuffled batches, step by step.

    Returns one history per model: ``{"loss": [...], <metric>: [...]}``, the
    mean of its batch values per epoch. ``callbacks`` get the train-begin,
    batch-end, epoch-end and train-end events.
    """
    models = list(models)
    if not models:
        raise ValueError("`models` must name at least one compiled model.")
    if int(epochs) < 0 or int(batch_size) < 1:
        raise ValueError(f"Need `epochs` >= 0 and `batch_size` >= 1, got {epochs}, {batch_size}.")
    x, y = np.asarray(x), np.asarray(y)
    rng = np.random.default_rng(seed)
    histories = [dict() for _ in models]
    for cb in callbacks:
        cb.on_train_begin()
    for epoch in range(int(epochs)):
        order = rng.permutation(len(x))
        sums = [dict() for _ in models]
        batches = 0
        for start in range(0, len(x), int(batch_size)):
            idx = order[start:start + int(batch_size)]
            for model, acc in zip(models, sums):
                logs = model.train_on_batch(x[idx], y[idx], return_dict=True)
                for k, v in logs.items():
                    acc[k] = acc.get(k, 0.0) + float(v)
            batches += 1
            for cb in callbacks:
                cb.on_train_batch_end(batches - 1)
        for hist, acc in zip(histories, sums):
            for k, v in acc.items():
                hist.setdefault(k, []).append(v / batches)
        for cb in callbacks:
            cb.on_epoch_end(epoch)
    for cb in callbacks:
        cb.on_train_end()
    return histories
