"""The ALQ pipeline (paper Alg. 5) as one callback schedule, or one call.

After initialisation by sketching (:func:`kquant.alq.quantize`), each of
``rounds`` rounds is: prune (``prune_epochs``, Alg. 2, weights held) → bases
step (``bases_epochs``, Alg. 3, lr ``bases_lr``) → coordinates step
(``coordinates_epochs``, Alg. 4, lr ``coordinates_lr``); each phase's lr is
multiplied by ``decay`` after half of its epochs (paper App. B.2). Round ``r``
prunes to ``b_r = max(target_bits, ratio · b_{r−1})`` average bits, and the
last round to ``target_bits`` when one is given.
"""

from __future__ import annotations

import keras

from kquant.alq.layers import alq_layers
from kquant.alq.optimizer import ALQ
from kquant.alq.pruning import PruningRun, average_bitwidth, sync_training_state


class ALQSchedule(keras.callbacks.Callback):
    """Drives phase, learning rate and pruning of an :class:`~kquant.optimizers.ALQ` fit.

    ``model.fit(..., epochs=schedule.total_epochs, callbacks=[schedule])``;
    ``schedule.log`` holds one row per epoch (round, phase, lr, average bits, metrics).
    """

    def __init__(self, rounds=4, prune_epochs=1, bases_epochs=10, coordinates_epochs=20,
                 bases_lr=1e-3, coordinates_lr=1e-4, decay=0.1, ratio=0.7, target_bits=None,
                 top_k=0.01, steps_per_epoch=None, verbose=1):
        super().__init__()
        for arg, value in (("rounds", rounds), ("prune_epochs", prune_epochs),
                           ("bases_epochs", bases_epochs),
                           ("coordinates_epochs", coordinates_epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{arg}` must be an integer >= 0, got {value!r}.")
        if rounds < 1:
            raise ValueError(f"`rounds` must be >= 1, got {rounds}.")
        if not 0 < float(ratio) <= 1:
            raise ValueError(f"`ratio` must be in (0, 1], got {ratio!r}.")
        if target_bits is not None and not float(target_bits) >= 0:
            raise ValueError(f"`target_bits` must be >= 0, got {target_bits!r}.")
        self.rounds, self.ratio, self.target_bits = rounds, float(ratio), target_bits
        self.bases_lr, self.coordinates_lr, self.decay = bases_lr, coordinates_lr, decay
        self.top_k, self.steps_per_epoch, self.verbose = top_k, steps_per_epoch, verbose
        self.plan = []  # (round, phase, lr) per epoch
        for r in range(rounds):
            self.plan += [(r, "prune", coordinates_lr)] * prune_epochs
            for phase, count, lr in (("bases", bases_epochs, bases_lr),
                                     ("coordinates", coordinates_epochs, coordinates_lr)):
                self.plan += [(r, phase, lr if e < (count + 1) // 2 else lr * decay)
                              for e in range(count)]
        self.log = []
        self._pruning = None
        self._round_targets = []

    @property
    def total_epochs(self) -> int:
        return len(self.plan)

    def round_targets(self, start_bits):
        """Average bitwidth after each round's pruning."""
        targets, bits = [], start_bits
        for r in range(self.rounds):
            bits = bits * self.ratio
            if self.target_bits is not None:
                bits = max(bits, float(self.target_bits))
                if r == self.rounds - 1:
                    bits = float(self.target_bits)
            targets.append(bits)
        return targets

    def on_train_begin(self, logs=None):
        if not isinstance(self.model.optimizer, ALQ):
            raise TypeError("ALQSchedule needs the model compiled with kquant.optimizers.ALQ, got "
                            f"{type(self.model.optimizer).__name__}.")
        self._layers = alq_layers(self.model)
        if not self._layers:
            raise ValueError("ALQSchedule: the model has no ALQ layer (use kquant.alq.quantize).")
        self._round_targets = self.round_targets(average_bitwidth(self._layers))

    def on_epoch_begin(self, epoch, logs=None):
        if epoch >= len(self.plan):
            return
        r, phase, lr = self.plan[epoch]
        sync_training_state(self.model)
        optimizer = self.model.optimizer
        optimizer.phase = phase
        optimizer.learning_rate.assign(lr)
        starts_pruning = phase == "prune" and (epoch == 0 or self.plan[epoch - 1][1] != "prune")
        if starts_pruning:
            epochs = sum(1 for p in self.plan if p[0] == r and p[1] == "prune")
            per_epoch = self.steps_per_epoch or self.params.get("steps") or 1
            self._pruning = PruningRun(self._layers, optimizer, self._round_targets[r],
                                       epochs * per_epoch, self.top_k)

    def on_train_batch_end(self, batch, logs=None):
        if self._pruning is not None and not self._pruning.finished:
            sync_training_state(self.model)
            self._pruning.step()

    def on_epoch_end(self, epoch, logs=None):
        if epoch >= len(self.plan):
            return
        sync_training_state(self.model)
        r, phase, lr = self.plan[epoch]
        if phase == "prune" and self._pruning is not None:
            while not self._pruning.finished:  # fewer batches than planned: finish the round
                self._pruning.step()
        row = {"epoch": epoch + 1, "round": r + 1, "phase": phase, "lr": lr,
               "average_bits": average_bitwidth(self._layers)}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        self.log.append(row)
        self.model.optimizer.warn_if_non_finite()
        if self.verbose:
            metrics = ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                if k not in ("epoch", "round", "phase", "lr", "average_bits"))
            print(f"ALQ round {r + 1}/{self.rounds} {phase:<11} epoch {epoch + 1}: "
                  f"lr {lr:.2g}, {row['average_bits']:.3f} bits/weight, {metrics}")


def fit_pipeline(model, x, y=None, *, batch_size=128, validation_data=None, verbose="auto",
                 optimizer=None, loss=None, metrics=("accuracy",), jit_compile="auto",
                 **schedule_kwargs):
    """Run Alg. 5 on an ALQ model in one ``model.fit``; returns ``(history, schedule)``.

    The model is compiled with ``optimizer`` (default :class:`ALQ`) and ``loss``
    (default sparse categorical cross-entropy on logits).
    """
    schedule = ALQSchedule(verbose=1 if verbose else 0, **schedule_kwargs)
    model.compile(
        optimizer=optimizer or ALQ(schedule.bases_lr),
        loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=list(metrics), jit_compile=jit_compile,
    )
    history = model.fit(x, y, batch_size=batch_size, epochs=schedule.total_epochs,
                        validation_data=validation_data, callbacks=[schedule], verbose=verbose)
    return history, schedule
