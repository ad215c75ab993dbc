"""Pruning in the α domain (ALQ paper §3.2, Alg. 2).

Removing coordinate ``α_i`` (and its basis) costs, under the α-domain quadratic
model of the ALQ optimizer, ``f_i = −g_{α,i}α_i + ½H_{α,ii}α_i²`` (Eq. 13).
Over ``T`` steps the network's bit budget ``W = Σ_layers n_l·#active α_l``
(weights × bits) goes linearly from ``W_0`` to ``W_T = target_bits · N``; at
each step every layer offers its lowest-f coordinates, the same share ``k`` of
its active ones (the paper's top-k %, k ≈ 0.5–1 %), the offers are sorted
globally and the smallest are removed until the budget is met. Only when
``k`` cannot cover the step (few steps per epoch, unlike the paper's ~470)
does the share grow, for every layer alike, to ``CHOICE`` = 3× the step's
fraction of the whole budget (the global sort keeps a choice; a uniform share
of exactly the step would prune every layer alike): a small layer can no
longer cover a step alone, as the old per-layer minimum quota allowed. With equal group sizes this removes ``M_p ≈ (M_0 − M_T)/T``
bases per step, as in the paper.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from kquant.alq.layers import alq_layers


def alq_optimizer(optimizer):
    """The :class:`~kquant.optimizers.ALQ` inside ``optimizer`` (itself, or wrapped by
    ``LossScaleOptimizer`` / ``SkipNonFinite``); ``TypeError`` if there is none."""
    from kquant.alq.optimizer import ALQ

    found = optimizer
    while not isinstance(found, ALQ) and hasattr(found, "inner_optimizer"):
        found = found.inner_optimizer
    if not isinstance(found, ALQ):
        raise TypeError("The model must be compiled with kquant.optimizers.ALQ (optionally "
                        f"wrapped in a LossScaleOptimizer), got {type(optimizer).__name__}.")
    return found


def sync_training_state(model):
    """Backend seam: make variables current inside ``fit`` so a callback may read/write them.

    JAX's trainer keeps the state outside the variables between batches;
    ``jax_state_sync`` writes it back and the next batch reloads it.
    """
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()


def average_bitwidth(layers) -> float:
    """Average bits per weight, weighted by each layer's weight count."""
    bits = sum(int(l.group_bitwidths().sum()) * l.layout.group_size for l in layers)
    weights = sum(l.layout.num_weights for l in layers)
    return bits / weights if weights else 0.0


def importance(layer, optimizer):
    """Eq. 13 for every slot of ``layer`` (``+inf`` on inactive slots), NumPy ``[G, I_max]``."""
    g, h = optimizer.alpha_quadratic_model(layer)
    alpha = np.asarray(ops.convert_to_numpy(layer.coordinates))
    mask = np.asarray(ops.convert_to_numpy(layer.mask))
    f = -g * alpha + 0.5 * h * alpha * alpha
    return np.where(mask > 0, f, np.inf)


def remove(layer, optimizer, flat_indices):
    """Remove the given slots (flat ``[G·I_max]`` indices): mask, α and their α moments → 0."""
    keep = np.ones(layer.mask.shape, dtype=np.float32).reshape(-1)
    keep[np.asarray(flat_indices, dtype=int)] = 0.0
    keep = keep.reshape(layer.mask.shape)
    for variable in (layer.mask, layer.coordinates, *optimizer.alpha_moments(layer)):
        variable.assign(np.asarray(ops.convert_to_numpy(variable)) * keep)


CHOICE = 3.0  # offers ≥ 3× the step, so the global sort still chooses among layers


def prune_once(layers, optimizer, bits_to_remove, top_k=0.01):
    """Remove the lowest-f bases until at least ``bits_to_remove`` weight-bits are gone.

    Returns the number of bases removed per layer.
    """
    if bits_to_remove <= 0:
        return [0] * len(layers)
    offers = []  # (f, layer index, flat slot, cost in weight-bits)
    budget = sum(int(l.group_bitwidths().sum()) * l.layout.group_size for l in layers)
    share = min(1.0, max(float(top_k), CHOICE * bits_to_remove / budget)) if budget else 1.0
    for li, layer in enumerate(layers):
        f = importance(layer, optimizer).reshape(-1)
        active = np.flatnonzero(np.isfinite(f))
        if active.size == 0:
            continue
        k = min(active.size, max(1, math.ceil(share * active.size)))
        chosen = active[np.argsort(f[active], kind="stable")[:k]]
        offers.extend((f[j], li, j, layer.layout.group_size) for j in chosen)
    offers.sort(key=lambda o: o[0])
    removed, per_layer = 0, [[] for _ in layers]
    for _, li, j, cost in offers:
        if removed >= bits_to_remove:
            break
        per_layer[li].append(j)
        removed += cost
    for layer, slots in zip(layers, per_layer):
        if slots:
            remove(layer, optimizer, slots)
    return [len(s) for s in per_layer]


class PruningRun:
    """One execution of Alg. 2: ``steps`` pruning iterations down to ``target_bits``."""

    def __init__(self, layers, optimizer, target_bits, steps, top_k=0.01, start_budget=None,
                 done=0):
        if not layers:
            raise ValueError("No ALQ layer to prune.")
        if not float(target_bits) >= 0:
            raise ValueError(f"`target_bits` must be >= 0, got {target_bits!r}.")
        if int(steps) < 1:
            raise ValueError(f"`steps` must be >= 1, got {steps!r}.")
        if not 0 < float(top_k) <= 1:
            raise ValueError(f"`top_k` must be in (0, 1], got {top_k!r}.")
        self.layers, self.optimizer = list(layers), optimizer
        self.steps, self.top_k = int(steps), float(top_k)
        self.total_weights = sum(l.layout.num_weights for l in self.layers)
        # A resumed run passes the budget it started from and the steps already done.
        self.start_budget = self._budget() if start_budget is None else float(start_budget)
        self.target_budget = min(float(target_bits) * self.total_weights, self.start_budget)
        self.done = int(done)
        self.history = []

    def _budget(self):
        return sum(int(l.group_bitwidths().sum()) * l.layout.group_size for l in self.layers)

    @property
    def finished(self) -> bool:
        return self.done >= self.steps

    def step(self):
        """One pruning iteration; returns the bases removed per layer."""
        if self.finished:
            return [0] * len(self.layers)
        self.done += 1
        goal = self.start_budget + (self.target_budget - self.start_budget) * self.done / self.steps
        removed = prune_once(self.layers, self.optimizer, self._budget() - goal + 1e-9, self.top_k)
        self.history.append({"step": self.done, "removed": int(sum(removed)),
                             "average_bits": average_bitwidth(self.layers)})
        return removed


class ALQPruning(keras.callbacks.Callback):
    """Alg. 2 as a callback: prune over the first ``steps`` batches of training.

    The optimizer must be :class:`kquant.optimizers.ALQ`; it is switched to
    phase ``"prune"`` while pruning (state held, moments updated) unless
    ``hold_weights=False``, and back to ``after_phase`` when done.
    """

    def __init__(self, target_bits, steps, top_k=0.01, hold_weights=True,
                 after_phase="coordinates"):
        super().__init__()
        self.target_bits, self.steps, self.top_k = target_bits, steps, top_k
        self.hold_weights, self.after_phase = hold_weights, after_phase
        self.run = None

    def on_train_begin(self, logs=None):
        optimizer = alq_optimizer(self.model.optimizer)
        self.run = PruningRun(alq_layers(self.model), optimizer, self.target_bits,
                              self.steps, self.top_k)
        if self.hold_weights:
            optimizer.phase = "prune"

    def on_train_batch_end(self, batch, logs=None):
        if self.run is not None and not self.run.finished:
            sync_training_state(self.model)
            self.run.step()
            if self.run.finished and self.hold_weights:
                alq_optimizer(self.model.optimizer).phase = self.after_phase
