"""The ALQ pipeline (paper Alg. 5) as one callback schedule, or one call.

After initialisation by sketching (:func:`kquant.alq.quantize`), each of
``rounds`` rounds is: prune (``prune_epochs``, Alg. 2, weights held) → bases
step (``bases_epochs``, Alg. 3, lr ``bases_lr``) → coordinates step
(``coordinates_epochs``, Alg. 4, lr ``coordinates_lr``); each phase's lr is
multiplied by ``decay`` after half of its epochs (paper App. B.2). Round ``r``
prunes to ``b_r = max(target_bits, ratio^r · b_0)`` average bits (Alg. 5:
``M^{r+1} = ratio · M^r``, 0.7 in the paper, 0.6 on LeNet5): ``target_bits``
is a floor, reached smoothly by enough rounds
(:meth:`ALQSchedule.rounds_needed`), never by a jump.

The schedule's progress lives in the optimizer's variables (the starting
bitwidth ``b_0``, the pruning run's starting budget and steps done), and the
plan is indexed by the epoch, so a run resumed from a checkpoint
(``keras.callbacks.BackupAndRestore``, or ``model.save`` then
``fit_pipeline(..., initial_epoch=k)``) continues exactly.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from kquant.alq.layers import alq_layers
from kquant.alq.optimizer import ALQ
from kquant.alq.pruning import PruningRun, alq_optimizer, average_bitwidth, sync_training_state
from kquant.validation import check_jit_compile


class ALQSchedule(keras.callbacks.Callback):
    """Drives phase, learning rate and pruning of an :class:`~kquant.optimizers.ALQ` fit.

    ``model.fit(..., epochs=schedule.total_epochs, callbacks=[schedule])``;
    ``schedule.log`` holds one row per epoch (round, the phase and learning rate read back
    from the optimizer, average bits, metrics).
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
        if not 0 < float(top_k) <= 1:
            raise ValueError(f"`top_k` must be in (0, 1], got {top_k!r}.")
        if steps_per_epoch is not None and (isinstance(steps_per_epoch, bool) or
                                            not isinstance(steps_per_epoch, int) or
                                            steps_per_epoch < 1):
            raise ValueError(f"`steps_per_epoch` must be a positive integer, got {steps_per_epoch!r}.")
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

    @staticmethod
    def rounds_needed(start_bits, target_bits, ratio=0.7) -> int:
        """Rounds of the ``ratio`` schedule that take ``start_bits`` down to ``target_bits``."""
        if not 0 < float(ratio) < 1:
            raise ValueError(f"`ratio` must be in (0, 1), got {ratio!r}.")
        if not float(target_bits) > 0:
            raise ValueError(f"`target_bits` must be > 0, got {target_bits!r}.")
        if start_bits <= target_bits:
            return 1
        return max(1, math.ceil(math.log(target_bits / start_bits) / math.log(ratio) - 1e-9))

    def round_targets(self, start_bits):
        """Average bitwidth after each round's pruning: ``max(target_bits, ratio^r · b_0)``."""
        targets, bits = [], start_bits
        for _ in range(self.rounds):
            bits = bits * self.ratio
            if self.target_bits is not None:
                bits = max(bits, float(self.target_bits))
            targets.append(bits)
        return targets

    def _optimizer(self) -> ALQ:
        return alq_optimizer(self.model.optimizer)

    def on_train_begin(self, logs=None):
        optimizer = self._optimizer()
        self._layers = alq_layers(self.model)
        if not self._layers:
            raise ValueError("ALQSchedule: the model has no ALQ layer (use kquant.alq.quantize).")
        self._pruning = None
        self._round_targets = None

    def _start(self, epoch, optimizer):
        """At the first epoch of this fit (after BackupAndRestore has restored the
        checkpoint, whatever the callback order): epoch 0 starts a fresh pipeline from
        the current bitwidth; a later epoch resumes from the saved schedule state."""
        if epoch == 0:
            optimizer.set_schedule_state(start_bits=average_bitwidth(self._layers),
                                         prune_start_budget=-1, prune_steps_done=0)
        elif optimizer.schedule_state()["start_bits"] is None:
            raise ValueError(f"ALQSchedule: cannot resume at epoch {epoch}: the optimizer holds "
                             "no saved schedule state (resume from a checkpoint of this "
                             "pipeline, or start at `initial_epoch=0`).")
        # Targets from the saved (float32) b_0, so a resumed run computes the same ones.
        self._round_targets = self.round_targets(optimizer.schedule_state()["start_bits"])

    def _prune_steps(self, r):
        epochs = sum(1 for p in self.plan if p[0] == r and p[1] == "prune")
        per_epoch = self.steps_per_epoch or self.params.get("steps") or 1
        return epochs * per_epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch >= len(self.plan):
            return
        r, phase, lr = self.plan[epoch]
        sync_training_state(self.model)
        optimizer = self._optimizer()
        if self._round_targets is None:
            self._start(epoch, optimizer)
        optimizer.phase = phase
        optimizer.learning_rate.assign(lr)
        if phase == "prune" and self._pruning is None:
            state = optimizer.schedule_state()
            resumed = state["prune_start_budget"] is not None
            self._pruning = PruningRun(
                self._layers, optimizer, self._round_targets[r], self._prune_steps(r), self.top_k,
                start_budget=state["prune_start_budget"] if resumed else None,
                done=state["prune_steps_done"] if resumed else 0)
            optimizer.set_schedule_state(prune_start_budget=self._pruning.start_budget,
                                         prune_steps_done=self._pruning.done)

    def _prune_step(self):
        self._pruning.step()
        self._optimizer().set_schedule_state(prune_steps_done=self._pruning.done)

    def on_train_batch_end(self, batch, logs=None):
        if self._pruning is not None and not self._pruning.finished:
            sync_training_state(self.model)
            self._prune_step()

    def on_epoch_end(self, epoch, logs=None):
        if epoch >= len(self.plan):
            return
        sync_training_state(self.model)
        r, phase, _ = self.plan[epoch]
        last_prune_epoch = phase == "prune" and (epoch + 1 == len(self.plan) or
                                                 self.plan[epoch + 1][1] != "prune")
        if last_prune_epoch and self._pruning is not None:
            while not self._pruning.finished:  # fewer batches than planned: finish the round
                self._prune_step()
            self._pruning = None
            self._optimizer().set_schedule_state(prune_start_budget=-1, prune_steps_done=0)
        optimizer = self._optimizer()
        # what the optimizer ran this epoch, read back (not the plan): the log a
        # benchmark labels its rows with
        row = {"epoch": epoch + 1, "round": r + 1, "phase": optimizer.phase,
               "lr": float(ops.convert_to_numpy(optimizer.learning_rate)),
               "average_bits": average_bitwidth(self._layers)}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        self.log.append(row)
        optimizer.warn_if_non_finite()
        if self.verbose:
            metrics = ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                if k not in ("epoch", "round", "phase", "lr", "average_bits"))
            print(f"ALQ round {r + 1}/{self.rounds} {row['phase']:<11} epoch {epoch + 1}: "
                  f"lr {row['lr']:.2g}, {row['average_bits']:.3f} bits/weight, {metrics}")


def _strategy_scope(model):
    """Backend seam: the scope in which the model's variables live (TF ``tf.distribute``)."""
    import contextlib

    strategy = getattr(model, "distribute_strategy", None)
    if keras.backend.backend() == "tensorflow" and strategy is not None:
        return strategy.scope()
    return contextlib.nullcontext()


def _mirrored(model) -> bool:
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
    return isinstance(strategy, (tf.distribute.MirroredStrategy,
                                 tf.distribute.MultiWorkerMirroredStrategy))


def fit_pipeline(model, x, y=None, *, batch_size=128, validation_data=None, verbose="auto",
                 optimizer=None, loss=None, metrics=("accuracy",), jit_compile="auto",
                 callbacks=None, initial_epoch=0, shuffle=True, **schedule_kwargs):
    """Run Alg. 5 on an ALQ model in one ``model.fit``; returns ``(history, schedule)``.

    A model already compiled with :class:`ALQ` (possibly in a
    ``LossScaleOptimizer``) keeps its compilation when ``optimizer`` and
    ``loss`` are not given; otherwise (not compiled, or compiled with another
    optimizer) it is compiled with ``optimizer``
    (default: a new :class:`ALQ`, created in the model's distribution scope)
    and ``loss`` (default sparse categorical cross-entropy on logits).
    ``jit_compile="auto"`` is off under ``MirroredStrategy`` (which does not
    support XLA); ``callbacks`` run after the schedule; ``initial_epoch``
    resumes the plan at that epoch (e.g. after ``keras.models.load_model``).
    """
    schedule = ALQSchedule(verbose=1 if verbose else 0, **schedule_kwargs)
    jit_compile = check_jit_compile(jit_compile)
    if isinstance(initial_epoch, bool) or not isinstance(initial_epoch, int) or \
            not 0 <= initial_epoch <= schedule.total_epochs:
        raise ValueError(f"`initial_epoch` must be an integer in [0, {schedule.total_epochs}], "
                         f"got {initial_epoch!r}.")
    if _mirrored(model):
        if jit_compile is True:
            raise ValueError("`jit_compile=True` is not supported under tf.distribute."
                             "MirroredStrategy; pass jit_compile='auto' or False.")
        jit_compile = False
    keep = False
    if optimizer is None and loss is None and getattr(model, "compiled", False) \
            and getattr(model, "optimizer", None) is not None:
        try:
            keep = alq_optimizer(model.optimizer) is not None
        except TypeError:  # compiled for something else (e.g. the float twin's Adam)
            keep = False
    if not keep:
        with _strategy_scope(model):
            model.compile(
                optimizer=optimizer or ALQ(schedule.bases_lr),
                loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=list(metrics), jit_compile=jit_compile,
            )
    history = model.fit(x, y, batch_size=batch_size, epochs=schedule.total_epochs,
                        initial_epoch=initial_epoch, validation_data=validation_data,
                        callbacks=[schedule, *(callbacks or [])], shuffle=shuffle, verbose=verbose)
    return history, schedule
