"""Shared harness of the benchmark suite: config, data, timing, result files.

Each benchmark is a module ``benchmarks/<name>.py`` exposing
``run(cfg: BenchConfig) -> Result``; the harness (``python -m benchmarks NAME``
or ``kquant bench NAME``) writes ``results.json``, ``results.md`` and, when the
result has a plot, ``plot.png`` under ``<out_dir>/<name>/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import platform
import time

import keras
import numpy as np


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
    out_dir: str = "results"
    max_train: int | None = None       # cap on training examples (quick/tiny scales)

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


def environment():
    return {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }


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
    md.append(f"Backend: {meta['environment']['backend']}, scale: "
              f"{'tiny' if cfg.tiny else 'quick' if cfg.quick else 'full'}, dataset: {cfg.dataset}\n")
    md.append(markdown_table(result.rows, result.columns))
    (folder / "results.md").write_text("\n".join(md))
    if result.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        result.plot(folder / "plot.png")
    return folder
