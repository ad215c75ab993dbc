"""Shared harness of the benchmark suite: config, data, timing, result files.

Each benchmark is a module ``kquant/benchmarks/<name>.py`` exposing
``run(cfg: BenchConfig) -> Result``; the harness (``kquant bench NAME``,
``python -m kquant.benchmarks NAME``, or ``python -m benchmarks NAME`` from
the repository root) writes ``results.json``, ``results.md`` and, when the
result has a plot, ``plot.png`` under ``<out_dir>/<name>/``.

Distribution is one seam, :func:`strategy_scope`: ``tf.distribute``
(default / mirrored / TPU) on TensorFlow, ``keras.distribution.DataParallel``
on JAX. The harness runs every benchmark inside it; build models inside it
too (``with strategy_scope(cfg): model = ...``) when calling ``run`` directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import platform
import time

import keras
import numpy as np

from kquant import runtime


@dataclasses.dataclass
class BenchConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    epochs: int | None = None          # None: the benchmark's own default for the scale
    batch_size: int = 128
    quick: bool = True
    tiny: bool = False                 # smoke-test scale (seconds), used by the test suite
    seed: int = 0
    strategy: str = "default"          # default | mirrored | tpu (tf.distribute) | data_parallel (JAX)
    out_dir: str = "benchmarks/results"
    max_train: int | None = None       # cap on training examples (quick/tiny scales)
    options: dict = dataclasses.field(default_factory=dict)  # benchmark-specific (-o KEY=VALUE)

    @property
    def scale(self) -> str:
        return "tiny" if self.tiny else ("quick" if self.quick else "full")

    def option(self, key, default=None):
        """A benchmark-specific setting given as ``-o key=value`` (else ``default``)."""
        return self.options.get(key, default)

    def epochs_or(self, quick, full, tiny=1):
        if self.epochs is not None:
            return self.epochs
        return tiny if self.tiny else (quick if self.quick else full)


@dataclasses.dataclass
class Result:
    name: str
    rows: list[dict]
    meta: dict = dataclasses.field(default_factory=dict)
    plot: object = None  # callable(path) drawing a matplotlib figure to ``path``
    columns: list[str] | None = None


def set_seed(seed):
    keras.utils.set_random_seed(int(seed))


def load_data(cfg: BenchConfig):
    """``(x_train, y_train), (x_test, y_test)``, cut to the chosen scale."""
    from kquant import datasets

    (x, y), (xt, yt) = datasets.load(cfg.dataset, data_dir=cfg.data_dir)
    cap = cfg.max_train or (256 if cfg.tiny else None)
    if cap:
        x, y = x[:cap], y[:cap]
        xt, yt = xt[: max(64, cap // 4)], yt[: max(64, cap // 4)]
    return (x, y), (xt, yt)


def compile_classifier(model, optimizer, **kwargs):
    """Compile for sparse-label logits; no XLA under MirroredStrategy (it does not support it)."""
    if not jit_compile_allowed():
        kwargs.setdefault("jit_compile", False)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        **kwargs,
    )
    return model


def step_time(model, x, y, batch_size, steps=20, warmup=3):
    """Median seconds of one ``train_on_batch`` step (after compiling warm-up)."""
    xb, yb = x[:batch_size], y[:batch_size]
    for _ in range(warmup):
        model.train_on_batch(xb, yb)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.train_on_batch(xb, yb)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _fmt(v):
    if v is None:   # not applicable to this row
        return ""
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows, columns=None):
    if not rows:
        return "(no rows)\n"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _cpu_name():
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def environment():
    """Backend, versions, devices and replica count, recorded with every result."""
    backend = keras.backend.backend()
    env = {
        "backend": backend,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "runtime": runtime.settings(),
    }
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            env["tensorflow"] = tf.__version__
            env["devices"] = [d.device_type for d in tf.config.list_logical_devices()]
            gpus = tf.config.list_physical_devices("GPU")
            env["device"] = (tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
                             if gpus else _cpu_name())
        elif backend == "jax":
            import jax

            env["jax"] = jax.__version__
            env["devices"] = [d.platform for d in jax.devices()]
            first = jax.devices()[0]
            env["device"] = (first.device_kind if first.platform != "cpu"
                             else _cpu_name())
    except Exception:  # pragma: no cover - informational only
        pass
    if _ACTIVE:
        env["strategy"] = _ACTIVE[-1][0]
        env["replicas"] = _ACTIVE[-1][1]
    return env


def write_result(result: Result, cfg: BenchConfig, command: str | None = None):
    """Write JSON + markdown (+ PNG) under ``cfg.out_dir/result.name``; return the folder."""
    folder = pathlib.Path(cfg.out_dir) / result.name
    folder.mkdir(parents=True, exist_ok=True)
    meta = {**result.meta, "config": dataclasses.asdict(cfg), "environment": environment()}
    if command:
        meta["command"] = command
    (folder / "results.json").write_text(
        json.dumps({"name": result.name, "rows": result.rows, "meta": meta}, indent=2, default=float)
    )
    md = [f"# {result.name}\n"]
    if command:
        md.append(f"Command: `{command}`\n")
    device = meta["environment"].get("device")
    md.append(f"Backend: {meta['environment']['backend']}"
              + (f", device: {device}" if device else "")
              + ", scale: "
              f"{'tiny' if cfg.tiny else 'quick' if cfg.quick else 'full'}, dataset: {cfg.dataset}\n")
    if meta["environment"].get("runtime"):
        md.append("Process settings (`kquant.runtime`): " + ", ".join(
            f"`{k}={v}`" for k, v in meta["environment"]["runtime"].items()) + "\n")
    md.append(markdown_table(result.rows, result.columns))
    (folder / "results.md").write_text("\n".join(md))
    if result.plot is not None:
        try:
            import matplotlib
        except ImportError:
            # the numbers are written; say plainly that the figure is not
            why = "plot.png not drawn: matplotlib is not installed (pip install 'kquant[plots]')."
            with open(folder / "results.md", "a") as f:
                f.write(f"\n{why}\n")
            import warnings

            warnings.warn(f"{result.name}: {why}", stacklevel=2)
            return folder
        matplotlib.use("Agg")
        result.plot(folder / "plot.png")
    return folder


def check_out_dir(out_dir) -> pathlib.Path:
    """Create ``out_dir`` and check it is writable *before* a benchmark runs.

    Raises ``ValueError`` naming ``out_dir`` (``--out-dir``), so no result is
    lost after hours of training.
    """
    folder = pathlib.Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"`out_dir` (--out-dir) {str(out_dir)!r} is a file, not a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"`out_dir` (--out-dir) {str(out_dir)!r} cannot be created: {e}") from e
    if not os.access(folder, os.W_OK):
        raise ValueError(f"`out_dir` (--out-dir) {str(out_dir)!r} is not writable.")
    return folder


def option_names(cfg: BenchConfig, key: str, default, allowed, benchmark: str) -> list[str]:
    """``cfg.option(key)`` as a list of names (a list or ``"a,b"``), each checked against ``allowed``."""
    names = cfg.option(key, default)
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"{benchmark}: option `{key}` names unknown {unknown}; "
                         f"choose from {list(allowed)}.")
    return list(names)


def accuracy_and_time_plot(rows, label, accuracy="test_accuracy", time_ratio="step_time_ratio_to_ste",
                           reference="STE"):
    """A ``Result.plot``: test accuracy and train-step time ratio per row, side by side."""

    def plot(path):
        import matplotlib.pyplot as plt

        labels = [str(r[label]) for r in rows]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(7, 1.2 * len(rows) + 4), 3.5))
        ax1.bar(labels, [r[accuracy] for r in rows])
        ax1.set_ylabel("test accuracy")
        low = min(r[accuracy] for r in rows)
        ax1.set_ylim(max(0.0, low - 0.1), 1.0)
        ax2.bar(labels, [r[time_ratio] for r in rows])
        ax2.axhline(1.0, color="k", lw=0.8)
        ax2.set_ylabel(f"train-step time / {reference}")
        for ax in (ax1, ax2):
            ax.tick_params(axis="x", rotation=20)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)

    return plot


# -- distribution strategy seam ------------------------------------------------
STRATEGIES = ("default", "mirrored", "tpu", "data_parallel")
_BACKEND_STRATEGIES = {
    "tensorflow": ("default", "mirrored", "tpu"),
    "jax": ("default", "data_parallel", "tpu"),
}
_ACTIVE: list[tuple[str, int]] = []   # (strategy name, replicas) of the scopes entered


class MissingPlugin(RuntimeError):
    """A benchmark needs an estimator/quantizer/module that is not installed."""


def require(*names, modules=()):
    """Raise :class:`MissingPlugin` unless the named estimators/quantizers and modules exist.

    The harness reports such a benchmark as skipped (``NAME=all``, the smoke tests).
    """
    import importlib.util

    from kquant import estimators, quantizers
    from kquant.registry import KNOWN_PROVIDERS

    installed = set(estimators.available()) | set(quantizers.available())
    for name in names:
        if name not in installed:
            hint = KNOWN_PROVIDERS.get(name, "a plugin registering it")
            raise MissingPlugin(f"{name!r} is not installed; it is provided by {hint}.")
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise MissingPlugin(f"module {module!r} is not importable.")


def check_strategy(name, backend=None) -> str:
    """Validate ``strategy`` for the backend; the error names the argument."""
    backend = backend or keras.backend.backend()
    if name not in STRATEGIES:
        raise ValueError(f"`strategy` (--strategy) must be one of {', '.join(STRATEGIES)}, got {name!r}.")
    allowed = _BACKEND_STRATEGIES.get(backend, ("default",))
    if name not in allowed:
        hint = {
            "mirrored": " On JAX use --strategy data_parallel (keras.distribution.DataParallel).",
            "data_parallel": " On TensorFlow use --strategy mirrored (tf.distribute.MirroredStrategy).",
        }.get(name, "")
        raise ValueError(
            f"`strategy` (--strategy) {name!r} is not available on the {backend} backend; "
            f"choose one of {', '.join(allowed)}.{hint}"
        )
    return name


def _split_lone_cpu(tf):
    """Two logical CPUs when there is one CPU and no GPU, so MirroredStrategy mirrors.

    Only possible before TensorFlow initialises its devices; afterwards the
    strategy simply has one replica.
    """
    if tf.config.list_physical_devices("GPU"):
        return
    cpus = tf.config.list_physical_devices("CPU")
    if len(cpus) == 1 and tf.config.get_logical_device_configuration(cpus[0]) is None:
        try:
            tf.config.set_logical_device_configuration(
                cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
        except RuntimeError:
            pass


@functools.lru_cache(maxsize=None)
def _tf_strategy(name, tpu_address):
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        _split_lone_cpu(tf)
        return tf.distribute.MirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


@functools.lru_cache(maxsize=None)
def _jax_distribution(name):
    if name == "default":
        return None
    devices = keras.distribution.list_devices("tpu" if name == "tpu" else None)
    if not devices:
        raise RuntimeError(f"`strategy` (--strategy) {name!r}: JAX sees no {name} device.")
    return keras.distribution.DataParallel(devices=devices)


def get_strategy(cfg_or_name="default"):
    """The backend's distribution object for a strategy name (cached per process).

    TensorFlow: a ``tf.distribute.Strategy``; JAX: a
    ``keras.distribution.DataParallel`` (``None`` for ``default``). TPU
    address: ``-o tpu=ADDRESS`` or ``$TPU_NAME`` (default ``local``, a TPU VM).
    """
    cfg = cfg_or_name if isinstance(cfg_or_name, BenchConfig) else None
    name = check_strategy(cfg.strategy if cfg else cfg_or_name)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        tpu = (cfg.option("tpu") if cfg else None) or os.environ.get("TPU_NAME", "local")
        return _tf_strategy(name, tpu)
    if backend == "jax":
        return _jax_distribution(name)
    return None


def num_replicas(strategy) -> int:
    if strategy is None:
        return 1
    if hasattr(strategy, "num_replicas_in_sync"):
        return int(strategy.num_replicas_in_sync)
    return int(np.size(strategy.device_mesh.devices))


@contextlib.contextmanager
def strategy_scope(cfg_or_name="default"):
    """Build (and train) models inside: ``with strategy_scope(cfg): model = ...``.

    Re-entrant; the harness wraps every ``run(cfg)`` in it. Yields the
    strategy/distribution object (``None`` for JAX ``default``).
    """
    strategy = get_strategy(cfg_or_name)
    name = cfg_or_name.strategy if isinstance(cfg_or_name, BenchConfig) else cfg_or_name
    _ACTIVE.append((name, num_replicas(strategy)))
    try:
        if strategy is None:
            yield None
        else:
            with strategy.scope():
                yield strategy
    finally:
        _ACTIVE.pop()


def jit_compile_allowed() -> bool:
    """``False`` inside a MirroredStrategy scope (XLA is not supported there)."""
    return not (_ACTIVE and _ACTIVE[-1][0] == "mirrored")


# -- side-by-side timing ---------------------------------------------------------
def timing_steps(cfg: BenchConfig) -> int:
    """Timed steps per model: 2 (tiny), 30 (quick), 100 (full); ``-o timing_steps=N``."""
    return int(cfg.option("timing_steps", 2 if cfg.tiny else 30 if cfg.quick else 100))


#: untimed steps at the start of each model's turn in :func:`compare_step_times`
SETTLE_STEPS = 3


def timed_fit_steps(model, x, y, batch_size, steps):
    """Seconds of each of ``steps`` training steps of ``model.fit`` on one repeated batch.

    Uses ``fit`` (not ``train_on_batch``) so the train function the benchmark
    already compiled is reused, and waits for each step's loss so async
    backends (JAX) are timed to completion. Works for ``tf_keras`` models too.
    """
    xb, yb = x[:batch_size], y[:batch_size]
    xs = np.concatenate([xb] * steps)
    ys = np.concatenate([yb] * steps)
    times, start = [], [0.0]

    def begin(batch, logs=None):
        start[0] = time.perf_counter()

    def end(batch, logs=None):
        if logs and "loss" in logs:
            float(logs["loss"])  # block until the step is done
        times.append(time.perf_counter() - start[0])

    callbacks = keras.callbacks
    if type(model).__module__.startswith("tf_keras"):
        import tf_keras

        callbacks = tf_keras.callbacks
    timer = callbacks.LambdaCallback(on_train_batch_begin=begin, on_train_batch_end=end)
    model.fit(xs, ys, batch_size=len(xb), epochs=1, shuffle=False, verbose=0, callbacks=[timer])
    return times


def step_peak_bytes(model, x, y, batch_size):
    """Bytes one settled training step of ``model.fit`` allocates at its peak beyond
    what the device held before it, or ``None`` where that is not known (backend seam).
    TensorFlow: from its BFC allocator's statistics, on a GPU or on a CPU with
    ``TF_CPU_ALLOCATOR_USE_BFC=true``, which the harness sets through
    :mod:`kquant.runtime`; XLA's temporaries and every tensor a step holds at once are
    counted; where TensorFlow runs a graph's ops concurrently (no XLA) the peak depends
    on their order (LeNet5 ALQ steps: up to 3.5 MiB apart between runs). JAX (which
    keeps no resettable peak): the temporaries XLA assigns to the compiled train step
    (``memory_analysis().temp_size_in_bytes``; its new state reuses the donated old
    one). Torch: ``None``."""
    if keras.backend.backend() == "jax":
        return _jax_step_temp_bytes(model, x[:batch_size], y[:batch_size])
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    device = "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"
    try:
        tf.config.experimental.get_memory_info(device)
    except ValueError:  # a CPU without the BFC allocator keeps no statistics
        return None
    info = tf.config.experimental.get_memory_info
    held = {}

    def begin(batch, logs=None):
        if batch == 1:   # the second step of this fit: compiled and settled
            held["before"] = info(device)["current"]
            tf.config.experimental.reset_memory_stats(device)

    def end(batch, logs=None):
        if batch == 1:
            float(logs["loss"])   # the step is done
            held["peak"] = info(device)["peak"]

    xb, yb = x[:batch_size], y[:batch_size]
    model.fit(np.concatenate([xb] * 2), np.concatenate([yb] * 2), batch_size=len(xb), epochs=1,
              shuffle=False, verbose=0, callbacks=[keras.callbacks.LambdaCallback(
                  on_train_batch_begin=begin, on_train_batch_end=end)])
    return max(held["peak"] - held["before"], 0)


def _jax_step_temp_bytes(model, x, y):
    """XLA's temporary bytes for ``model``'s train step on this batch (JAX), compiled as
    Keras compiles it (its state donated), or ``None`` where Keras' trainer does not
    expose that step (its ``train_step(state, data)``)."""
    import jax

    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)   # builds the state
    try:
        state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                     optimizer_variables=True, metrics_variables=True)
        compiled = jax.jit(model.train_step, donate_argnums=0).lower(state, (x, y)).compile()
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except (AttributeError, TypeError):   # another Keras trainer
        return None


def compare_step_times(models: dict, x, y, batch_size, steps=30, warmup=3, rounds=None,
                       settle=SETTLE_STEPS):
    """Median seconds of one steady training step per model, measured interleaved.

    The models take turns (``rounds`` rounds of ``steps / rounds`` timed steps each,
    the first model rotating), so a load change on a shared machine hits all of them
    alike and their ratios stay meaningful. Each model trains on the same batch; the
    first ``warmup`` steps (compilation) are not timed, nor are the first ``settle``
    steps of every turn: a turn's first steps pay for ``fit``'s start and for caches
    the other models evicted (TensorFlow, Dense 256 without XLA: 2.17, 0.82, 0.69,
    0.66 ms for a turn's steps 1–4; Dense 2048: 12.4, 11.0, 10.3, 9.9 ms), which a
    model training on its own does not.
    """
    for model in models.values():
        timed_fit_steps(model, x, y, batch_size, max(1, warmup))
    rounds = rounds or max(1, min(5, steps // 2))
    per_round = max(1, steps // rounds)
    times = {name: [] for name in models}
    order = list(models)
    for r in range(rounds):  # rotate who goes first, so no model always follows the same one
        for name in order[r % len(order):] + order[: r % len(order)]:
            times[name] += timed_fit_steps(models[name], x, y, batch_size,
                                           settle + per_round)[settle:]
    return {name: float(np.median(t)) for name, t in times.items()}


def distance_to(model, reference):
    """``max |w − w_ref|`` over the trainable weights of two same-architecture models
    (data-initialised statistics left out).

    The evidence that a row trained differently from its reference: a gradient rule
    that changes each gradient slightly (EWGS's fixed δ = 1e-3: at most 5e-4 relative)
    moves the latent weights but may flip no quantized level in a few steps, so the
    forward pass, and the loss, can equal the reference's to the last bit.
    """
    from kquant import step_state

    numpy = keras.ops.convert_to_numpy
    learned = [(a, b) for a, b in zip(model.trainable_weights, reference.trainable_weights)
               if not step_state.is_statistic(a)]   # not the data-initialised l₀, u₀, α₀
    return max(float(np.max(np.abs(numpy(a) - numpy(b)))) for a, b in learned)


# -- training helpers -----------------------------------------------------------
def iter_estimators(model):
    """The estimator layers inside a model's quantizers."""
    from kquant.estimators import Estimator

    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, Estimator):
            yield layer


class TrainingProgress(keras.callbacks.Callback):
    """Calls ``set_progress(epoch / epochs)`` on scheduled estimators (EDE) each epoch."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = max(int(epochs), 1)

    def on_epoch_begin(self, epoch, logs=None):
        for est in iter_estimators(self.model):
            if hasattr(est, "set_progress"):
                est.set_progress(epoch / self.epochs)


# -- result checks --------------------------------------------------------------
_RELATIVE_WORDS = ("delta", "vs", "minus", "diff", "gap", "change", "gain", "drop")


def sanity_problems(rows) -> list[str]:
    """What is wrong with a result's numbers (empty list: finite and plausible).

    Every number must be finite; columns named like accuracies lie in [0, 1]
    (or [0, 100] for percentages) and losses are ≥ 0 unless the name says it
    is a difference (``delta``, ``vs``, ``minus``, ``diff``, ...); times and
    ratios are > 0.
    """
    problems = []
    if not rows:
        return ["no rows"]
    for i, row in enumerate(rows):
        for key, value in row.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                continue
            v = float(value)
            where = f"row {i} {key}={value!r}"
            k = key.lower()
            relative = any(w in k for w in _RELATIVE_WORDS)  # a difference may be negative
            if not math.isfinite(v):
                problems.append(f"{where}: not finite")
            elif "acc" in k and not relative and not 0.0 <= v <= 100.0:
                problems.append(f"{where}: accuracy outside [0, 100]")
            elif "loss" in k and not relative and v < 0:
                problems.append(f"{where}: negative loss")
            elif (k.endswith("_ms") or k.endswith("_s") or "time" in k or "ratio" in k) and v <= 0:
                problems.append(f"{where}: time or ratio not positive")
    return problems


def format_command(argv) -> str:
    """The command line that reproduces a run (for results.md): with ``KERAS_BACKEND=…``
    first when the backend is not TensorFlow (the default)."""
    import shlex

    backend = keras.backend.backend()
    prefix = "" if backend == "tensorflow" else f"KERAS_BACKEND={backend} "
    return prefix + "python -m benchmarks " + " ".join(shlex.quote(a) for a in argv)
