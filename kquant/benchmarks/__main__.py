"""``python -m benchmarks NAME [NAME ...] [options]``: run benchmarks, write their results.

``NAME`` is a module of :mod:`kquant.benchmarks` or ``all``. ``kquant bench``
and, from the repository root, ``python -m benchmarks`` forward here.
"""

from __future__ import annotations

import json
import pathlib
import time
import traceback

import click

STRATEGY_CHOICES = ("default", "mirrored", "tpu", "data_parallel")
DATASET_CHOICES = ("digits", "mnist", "fashion_mnist", "cifar10")
DEFAULT_OUT_DIR = "benchmarks/results"


def _parse_options(pairs):
    """``("bits=2", "estimators=[\\"ste\\"]")`` -> ``{"bits": 2, ...}`` (JSON values, else strings)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="'-o' / '--option'")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("names", nargs=-1, metavar="NAME...")
@click.option("--dataset", type=click.Choice(DATASET_CHOICES), default="digits", show_default=True,
              help="digits is embedded (offline); the others come through tensorflow-datasets.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="tensorflow-datasets folder holding the prepared data set.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Override the benchmark's epochs for the scale.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--strategy", type=click.Choice(STRATEGY_CHOICES), default="default", show_default=True,
              help="tf.distribute (default, mirrored, tpu) on TensorFlow; "
                   "keras.distribution.DataParallel (data_parallel, tpu) on JAX.")
@click.option("--quick/--full", default=True, show_default=True,
              help="quick: minutes on a 2-core CPU; full: the papers' scale (GPU/TPU).")
@click.option("--tiny", is_flag=True, help="Smoke-test scale (seconds), as in the test suite.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False), default=DEFAULT_OUT_DIR,
              show_default=True, help="Results go to OUT_DIR/NAME/.")
@click.option("--max-train", type=click.IntRange(min=1), default=None,
              help="Use at most this many training examples.")
@click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Benchmark-specific setting (JSON value), repeatable; e.g. -o bits=2.")
@click.option("--list", "list_only", is_flag=True, help="List the benchmarks and exit.")
def main(names, dataset, data_dir, epochs, batch_size, strategy, quick, tiny, seed, out_dir,
         max_train, options, list_only):
    """Run the benchmark(s) NAME (a module of kquant.benchmarks, or `all`) and write
    results.json, results.md and plot.png under OUT_DIR/NAME/."""
    import kquant.benchmarks as benchmarks

    available = benchmarks.names()
    if list_only:
        click.echo("\n".join(available))
        return
    from kquant.benchmarks import common  # imports Keras and the backend
    if not names:
        raise click.UsageError(
            f"Missing argument NAME: one or more of {', '.join(available)}, or all (--list shows them).")
    chosen = available if "all" in names else list(dict.fromkeys(names))
    unknown = [n for n in chosen if n not in available]
    if unknown:
        raise click.BadParameter(
            f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available)}, all.",
            param_hint="NAME")
    try:
        common.check_strategy(strategy)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--strategy'") from None
    try:
        common.check_out_dir(out_dir)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--out-dir'") from None
    parsed = _parse_options(options)
    try:
        benchmarks.check_options(chosen, parsed)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'-o' / '--option'") from None
    cfg = common.BenchConfig(
        dataset=dataset, data_dir=data_dir, epochs=epochs, batch_size=batch_size, quick=quick,
        tiny=tiny, seed=seed, strategy=strategy, out_dir=out_dir, max_train=max_train,
        options=parsed,
    )
    status = {}
    for name in chosen:
        command = common.format_command(_rebuild_argv(name, cfg, options))
        click.echo(f"== {name} ({cfg.scale}, {dataset}, strategy={strategy})", err=True)
        t0 = time.perf_counter()
        try:
            result, folder = benchmarks.run_benchmark(name, cfg, command)
        except Exception as e:  # one failure never stops `all`
            if benchmarks.is_missing_plugin(e):
                status[name] = f"skipped: {e}"
            else:
                traceback.print_exc()
                status[name] = f"FAILED: {type(e).__name__}: {e}"
            click.echo(f"   {status[name]}", err=True)
            continue
        problems = common.sanity_problems(result.rows)
        status[name] = f"ok ({time.perf_counter() - t0:.0f} s) -> {folder}"
        click.echo((folder / "results.md").read_text())
        if problems:
            status[name] += f"; WARNING: {'; '.join(problems[:5])}"
    click.echo("Summary:\n" + "\n".join(f"  {n}: {s}" for n, s in status.items()), err=True)
    if any(s.startswith("FAILED") for s in status.values()):
        raise SystemExit(1)
    if not any(s.startswith("ok") for s in status.values()):
        raise SystemExit(2)


def _rebuild_argv(name, cfg, options):
    """Canonical arguments reproducing one benchmark's run (no machine-specific paths)."""
    argv = [name]
    argv.append("--tiny" if cfg.tiny else "--quick" if cfg.quick else "--full")
    if cfg.dataset != "digits":
        argv += ["--dataset", cfg.dataset]
    if cfg.data_dir is not None:
        argv += ["--data-dir", "DATA_DIR"]
    if cfg.epochs is not None:
        argv += ["--epochs", str(cfg.epochs)]
    if cfg.batch_size != 128:
        argv += ["--batch-size", str(cfg.batch_size)]
    if cfg.strategy != "default":
        argv += ["--strategy", cfg.strategy]
    if cfg.seed != 0:
        argv += ["--seed", str(cfg.seed)]
    if cfg.max_train is not None:
        argv += ["--max-train", str(cfg.max_train)]
    out_dir = pathlib.PurePath(cfg.out_dir)
    if not out_dir.is_absolute() and out_dir != pathlib.PurePath(DEFAULT_OUT_DIR):
        argv += ["--out-dir", out_dir.as_posix()]   # a folder of the repository
    for pair in options:
        argv += ["-o", pair]
    return argv


if __name__ == "__main__":
    main(prog_name="python -m benchmarks")
