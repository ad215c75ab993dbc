"""The ``kquant`` command line: list plugins, train a quantized model, run benchmarks."""

from __future__ import annotations

import os
import sys

import click
from rich.console import Console
from rich.table import Table

console = Console()


@click.group()
@click.version_option(package_name="kquant")
def main():
    """kquant: quantization-aware training for Keras 3."""


def _plugin_table(registry, title):
    table = Table(title=title)
    for col in ("name", "package", "description"):
        table.add_column(col)
    for info in registry.info():
        table.add_row(info.name, info.package, info.description)
    console.print(table)
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
@click.option("--dataset", default="digits", show_default=True,
              type=click.Choice(["digits", "mnist", "fashion_mnist", "cifar10"]),
              help="digits is embedded (offline); the others load through tensorflow-datasets.")
@click.option("--data-dir", default=None, help="tensorflow-datasets data folder.")
@click.option("--model", "model_name", default="small_convnet", show_default=True,
              type=click.Choice(["small_convnet", "chollet", "lenet5", "vgg_small", "resnet20"]))
@click.option("--quantizer", "kernel_quantizer", default="bwn", show_default=True,
              help="Kernel quantizer name (see `kquant quantizers`), or 'none'.")
@click.option("--bits", type=int, default=None, help="Kernel bits (dorefa, uniform).")
@click.option("--estimator", default=None, help="Gradient estimator (see `kquant estimators`).")
@click.option("--input-quantizer", default="none", show_default=True,
              help="Activation quantizer name, or 'none'.")
@click.option("--input-bits", type=int, default=None, help="Activation bits (uniform).")
@click.option("--epochs", default=15, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", "learning_rate", default=3e-3, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--float-baseline/--no-float-baseline", default=False,
              help="Also train the float twin and print its accuracy.")
@click.option("--skip-first/--no-skip-first", default=False, help="Keep the first layer float.")
@click.option("--skip-last/--no-skip-last", default=False, help="Keep the last layer float.")
@click.option("--save", type=click.Path(dir_okay=False), default=None, help="Save the model (.keras).")
@click.option("--export", type=click.Path(dir_okay=False), default=None,
              help="Export bit-packed deployable weights (.npz).")
@click.option("--quiet", is_flag=True, help="No Keras progress bars.")
def fit(dataset, data_dir, model_name, kernel_quantizer, bits, estimator, input_quantizer,
        input_bits, epochs, batch_size, learning_rate, seed, float_baseline, skip_first,
        skip_last, save, export, quiet):
    """Train a quantized model and print its accuracy and summary."""
    from kquant import training
    from kquant.datasets import DatasetUnavailable
    from kquant.registry import UnknownNameError
    from kquant.summary import summary

    try:
        result = training.fit(
            dataset=dataset, model=model_name, kernel_quantizer=kernel_quantizer, bits=bits,
            input_quantizer=input_quantizer, input_bits=input_bits, estimator=estimator,
            epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
            data_dir=data_dir, float_baseline=float_baseline, skip_first=skip_first,
            skip_last=skip_last, verbose=0 if quiet else 1,
        )
    except (DatasetUnavailable, UnknownNameError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    summary(result.model, console=console)
    console.print(f"test accuracy: {result.test_accuracy:.4f}  (loss {result.test_loss:.4f})")
    if result.float_accuracy is not None:
        console.print(f"float twin test accuracy: {result.float_accuracy:.4f}")
    if "flip_ratio" in result.history:
        console.print(f"flip ratio in the last epoch: {result.history['flip_ratio'][-1]:.4f}")
    if save:
        result.model.save(save)
        console.print(f"saved {save}")
    if export:
        from kquant.deploy import export_weights

        rows = export_weights(result.model, export)
        packed = sum(r["packed_bytes"] for r in rows)
        console.print(f"exported {export}: quantized kernels {packed:,} bytes packed "
                      f"(float32: {sum(r['float32_bytes'] for r in rows):,})")


try:  # `kquant bench`, when the benchmark harness is importable
    from kquant.bench import bench_command

    main.add_command(bench_command, "bench")
except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
