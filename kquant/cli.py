"""The ``kquant`` command line: list plugins, train a quantized model, run benchmarks.

Importing this module imports neither Keras nor a backend (``kquant --help``
is instant); every command imports what it needs when it runs. Output reads
well in a terminal and in a file: Keras progress bars only on a TTY (one line
per epoch otherwise), tables that never cut a number, and ``--json`` for
machines.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys

import click
from rich.console import Console

console = Console()


@click.group()
@click.version_option(package_name="kquant")
def main():
    """kquant: quantization-aware training for Keras 3."""


# -- output helpers ----------------------------------------------------------------
def print_table(table, out=None):
    """Print a rich table whole: on a terminal cells fold, in a file the width fits it."""
    from kquant.summary import print_whole

    print_whole(table, out or console)


def echo_json(obj):
    """Print ``obj`` as JSON on stdout (the only thing printed with ``--json``)."""
    click.echo(json.dumps(obj, indent=2, default=_json_default))


def _json_default(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def progress_verbose(quiet=False):
    """Keras ``verbose``: 0 when quiet, progress bars (1) on a TTY, one line per epoch (2) otherwise."""
    if quiet:
        return 0
    return 1 if sys.stdout.isatty() else 2


class PositiveFloat(click.ParamType):
    """A finite float > 0 (``nan``, ``inf``, 0 and negatives are refused)."""

    name = "positive float"

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number.", param, ctx)
        if not math.isfinite(number) or number <= 0:
            self.fail(f"must be a finite number > 0, got {value!r}.", param, ctx)
        return number


def check_output_path(path, suffix, option):
    """Validate an output file path *before* any work: extension, folder, writability.

    Returns the path unchanged; raises :class:`click.BadParameter` naming ``option``.
    """
    if path is None:
        return None
    hint = f"'{option}'"
    if not str(path).endswith(suffix):  # case matters: Keras and NumPy check it so
        raise click.BadParameter(f"{path!r} must end with {suffix}.", param_hint=hint)
    if os.path.isdir(path):
        raise click.BadParameter(f"{path!r} is a folder; give a file name ending with {suffix}.",
                                 param_hint=hint)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise click.BadParameter(f"folder {os.path.dirname(path) or '.'!r} does not exist.",
                                 param_hint=hint)
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise click.BadParameter(f"{path!r} is not writable.", param_hint=hint)
    return path


def check_output_dir(path, option):
    """Create output folder ``path`` (if given) and check it is writable, before any work."""
    if path is None:
        return None
    if option == "--tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise click.BadParameter("TensorBoard logs need the tensorboard package: "
                                     "pip install 'kquant[tensorboard]'.", param_hint=f"'{option}'")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise click.BadParameter(f"cannot create folder {path!r}: {e}", param_hint=f"'{option}'") from e
    if not os.access(path, os.W_OK):
        raise click.BadParameter(f"folder {path!r} is not writable.", param_hint=f"'{option}'")
    return path


def _tensorboard_callbacks(log_dir):
    if log_dir is None:
        return ()
    import keras

    return (keras.callbacks.TensorBoard(log_dir=log_dir),)


def fallback_path(suffix):
    """A fresh file name in the current folder (else the temp folder) for work that must not be lost."""
    import tempfile
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    for folder in (os.getcwd(), tempfile.gettempdir()):
        if os.access(folder, os.W_OK):
            return os.path.join(folder, f"kquant-fit-{stamp}-{os.getpid()}{suffix}")
    return os.path.join(tempfile.gettempdir(), f"kquant-fit-{stamp}-{os.getpid()}{suffix}")


def _plugin_table(registry, title):
    from rich.table import Table

    table = Table(title=title)
    for col in ("name", "package", "description"):
        table.add_column(col)
    for info in registry.info():
        table.add_row(info.name, info.package, info.description)
    print_table(table)
    for name, why in registry.failures.items():
        console.print(f"[red]failed to load[/red] {name}: {why}")


@main.command()
def estimators():
    """List installed gradient estimators (entry points `kquant.estimators`)."""
    from kquant.estimators import registry

    _plugin_table(registry, "Installed gradient estimators")


@main.command()
def quantizers():
    """List installed forward quantizers (entry points `kquant.quantizers`)."""
    from kquant.quantizers import registry

    _plugin_table(registry, "Installed forward quantizers")


@main.command()
def optimizers():
    """List installed optimizers (entry points `kquant.optimizers`)."""
    from kquant.optimizers import registry

    _plugin_table(registry, "Installed optimizers")


def _key_values(ctx, param, values):
    """``KEY=VALUE`` options as a dict; VALUE is read as JSON (numbers, true, "text") else text."""
    options = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE.", ctx=ctx, param=param)
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


@main.command()
@click.option("--dataset", default="digits", show_default=True, metavar="NAME|FILE.npz|FOLDER",
              help="digits (embedded, offline), mnist, fashion_mnist, cifar10 (keras.datasets cache, "
                   "or tensorflow-datasets with --data-dir), a .npz file (x_train, y_train, x_test, "
                   "y_test; or x, y) or a folder of images, one sub-folder per class.")
@click.option("--data-dir", default=None, help="tensorflow-datasets data folder.")
@click.option("--download", is_flag=True,
              help="Allow downloading mnist/fashion_mnist/cifar10 (keras.datasets) when not cached.")
@click.option("--image-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Side of the images read from an image folder.")
@click.option("--model", "model_name", default="small_convnet", show_default=True,
              type=click.Choice(["small_convnet", "chollet", "lenet5", "vgg_small", "resnet20"]))
@click.option("--quantizer", "kernel_quantizer", default="bwn", show_default=True,
              help="Kernel quantizer name (see `kquant quantizers`), or 'none'.")
@click.option("--bits", type=click.IntRange(min=1), default=None, help="Kernel bits (dorefa, uniform).")
@click.option("--estimator", default=None, help="Gradient estimator (see `kquant estimators`).")
@click.option("--input-quantizer", default="none", show_default=True,
              help="Activation quantizer name, or 'none'.")
@click.option("--input-bits", type=click.IntRange(min=1), default=None,
              help="Activation bits (uniform).")
@click.option("--epochs", default=15, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", "learning_rate", default=3e-3, show_default=True, type=PositiveFloat())
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--float-baseline/--no-float-baseline", default=False,
              help="Also train the float twin and print its accuracy.")
@click.option("--skip-first/--no-skip-first", default=False, help="Keep the first layer float.")
@click.option("--skip-last/--no-skip-last", default=False, help="Keep the last layer float.")
@click.option("--save", type=click.Path(dir_okay=False), default=None,
              help="Save the model; must end with .keras (checked before training).")
@click.option("--export", type=click.Path(dir_okay=False), default=None,
              help="Export bit-packed deployable weights; must end with .npz (checked before training).")
@click.option("--quiet", is_flag=True, help="No Keras progress output.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (accuracy, history, summary, files) on stdout; "
                   "progress goes to stderr.")
@click.option("--tensorboard", "tensorboard_dir", type=click.Path(file_okay=False), default=None,
              metavar="LOGDIR", help="Write TensorBoard logs (loss, accuracy, flip_ratio, "
                                     "skipped_steps, average_bits, per-layer bits) to LOGDIR.")
@click.option("--optimizer", default=None, metavar="NAME",
              help="Optimizer (see `kquant optimizers`, or a Keras name such as sgd); default "
                   "adam. bop trains the binary kernels, Adam(--lr) the other variables.")
@click.option("--optimizer-option", "optimizer_options", multiple=True, metavar="KEY=VALUE",
              callback=_key_values, help="Optimizer argument, repeatable (e.g. gamma=1e-3).")
@click.option("--jit-compile", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True,
              help="XLA for the train step. auto is Keras': on with JAX and on a TensorFlow "
                   "that sees a GPU, off on a CPU-only TensorFlow, where `on` fuses each "
                   "quantizer into the step.")
def fit(dataset, data_dir, download, image_size, model_name, kernel_quantizer, bits, estimator,
        input_quantizer, input_bits, epochs, batch_size, learning_rate, seed, float_baseline,
        skip_first, skip_last, save, export, quiet, as_json, optimizer=None,
        optimizer_options=None, tensorboard_dir=None, jit_compile="auto"):
    """Train a quantized model and print its accuracy and summary."""
    check_output_path(save, ".keras", "--save")
    check_output_path(export, ".npz", "--export")
    check_output_dir(tensorboard_dir, "--tensorboard")
    from kquant import datasets, training
    from kquant.registry import UnknownNameError
    from kquant.summary import summary

    try:
        datasets.check_source(dataset, param="--dataset")
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--dataset'") from None
    # with --json, stdout carries only the JSON object: Keras' progress goes to stderr
    redirect = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    try:
        with redirect:
            result = training.fit(
                dataset=dataset, model=model_name, kernel_quantizer=kernel_quantizer, bits=bits,
                input_quantizer=input_quantizer, input_bits=input_bits, estimator=estimator,
                epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                data_dir=data_dir, float_baseline=float_baseline, skip_first=skip_first,
                skip_last=skip_last, download=download, image_size=(image_size, image_size),
                optimizer=optimizer, optimizer_options=optimizer_options,
                jit_compile={"on": True, "off": False}.get(jit_compile, "auto"),
                callbacks=_tensorboard_callbacks(tensorboard_dir),
                verbose=progress_verbose(quiet) if not as_json else (0 if quiet else 2),
            )
    except (datasets.DatasetUnavailable, UnknownNameError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    info = summary(result.model, print_summary=False)
    files = _write_outputs(result.model, save, export, quiet=as_json)
    if as_json:
        echo_json({
            "test_accuracy": result.test_accuracy, "test_loss": result.test_loss,
            "float_accuracy": result.float_accuracy, "history": result.history,
            "jit_compile": bool(result.model.jit_compile),
            "summary": info.to_dict(), **files,
        })
        return
    summary(result.model, console=console)
    console.print(f"test accuracy: {result.test_accuracy:.4f}  (loss {result.test_loss:.4f})")
    if result.float_accuracy is not None:
        console.print(f"float twin test accuracy: {result.float_accuracy:.4f}")
    if "flip_ratio" in result.history:
        console.print(f"flip ratio in the last epoch: {result.history['flip_ratio'][-1]:.4f}")


def _write_outputs(model, save, export, quiet=False):
    """Save and export after training; a failure saves to a named fallback and exits non-zero."""
    say = (lambda msg: click.echo(msg, err=True)) if quiet else console.print
    files = {}
    if save:
        try:
            model.save(save)
        except Exception as e:
            fallback = fallback_path(".keras")
            model.save(fallback)
            raise click.ClickException(
                f"could not save to {save!r} ({type(e).__name__}: {e}); "
                f"the trained model was saved to {fallback!r} instead.") from e
        say(f"saved {save}")
        files["saved"] = save
    if export:
        from kquant.deploy.cli import export_model

        try:
            rows = export_model(model, export, "kquant")["rows"]
        except Exception as e:
            fallback = fallback_path(".keras")
            model.save(fallback)
            raise click.ClickException(
                f"could not export to {export!r} ({type(e).__name__}: {e}); "
                f"the trained model was saved to {fallback!r} instead.") from e
        packed = sum(r["packed_bytes"] for r in rows)
        say(f"exported {export}: quantized kernels {packed:,} bytes packed "
            f"(float32: {sum(r['float32_bytes'] for r in rows):,})")
        files["exported"] = export
        files["packed_bytes"] = packed
    return files


@main.command("summary")
@click.argument("model_path", metavar="MODEL.keras", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def summary_command(model_path, as_json):
    """Bits, memory, compression and MACs per layer of a saved model."""
    if not model_path.lower().endswith(".keras"):
        raise click.BadParameter(f"{model_path!r} must be a .keras file.", param_hint="'MODEL.keras'")
    import keras

    import kquant

    kquant.register_serializables()
    from kquant.summary import summary

    try:
        model = keras.saving.load_model(model_path)
    except Exception as e:
        raise click.ClickException(f"cannot load {model_path!r}: {type(e).__name__}: {e}") from e
    if as_json:
        echo_json(summary(model, print_summary=False).to_dict())
    else:
        summary(model, console=console)


@main.group()
def plot():
    """Draw figures (PNG files)."""


@plot.command("estimators")
@click.option("-o", "--out-dir", required=True, type=click.Path(file_okay=False),
              help="Folder for one NAME.png per estimator and estimators.png (all of them).")
@click.option("--range", "s_range", default=3.0, show_default=True, type=PositiveFloat(),
              help="Plot s in [-RANGE, RANGE] (s: distance to the decision boundary in half steps).")
def plot_estimators_command(out_dir, s_range):
    """Surrogate F(s) and derivative F'(s) of every installed estimator."""
    check_output_dir(out_dir, "--out-dir")
    from kquant import plots

    try:
        written, skipped = plots.plot_estimators(out_dir, s_range=s_range)
    except ImportError as e:
        raise click.ClickException(str(e)) from e
    for name, path in written.items():
        console.print(f"{name}: {path}")
    for name, why in skipped.items():
        console.print(f"{name}: not drawn, {why}")


main.add_command(__import__("kquant.deploy.cli", fromlist=["export_command"]).export_command)

try:  # `kquant bench`, when the benchmark harness is importable
    from kquant.bench import bench_command

    main.add_command(bench_command, "bench")
except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
