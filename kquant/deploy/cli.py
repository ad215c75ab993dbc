"""``kquant export MODEL.keras --format {kquant,onnx,litert} -o PATH`` (and ``kquant fit --export``)."""

from __future__ import annotations

import os

import click

FORMATS = {"kquant": ".npz", "onnx": ".onnx", "litert": ".tflite"}


def format_for(path):
    """The format a file name implies (``.npz`` → kquant, ``.onnx``, ``.tflite`` → litert)."""
    for fmt, suffix in FORMATS.items():
        if str(path).lower().endswith(suffix):
            return fmt
    raise ValueError(f"cannot tell the export format from {str(path)!r}: use a name ending with "
                     f"{', '.join(FORMATS.values())} or give `format` ({', '.join(FORMATS)}).")


def export_model(model, path, format=None, fold_batch_norm=None):  # noqa: A002 - CLI word
    """Export ``model`` to ``path`` in ``format`` (default: from the suffix); return a report.

    ``fold_batch_norm`` defaults to False for the native format (bit-identical to the
    training model) and is always on for ONNX/LiteRT.
    """
    format = format or format_for(path)
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {list(FORMATS)}, got {format!r}.")
    if format == "kquant":
        from kquant.deploy.native import export_weights

        rows = export_weights(model, path, fold_batch_norm=bool(fold_batch_norm))
        report = {"rows": rows}
    elif fold_batch_norm is False:
        raise ValueError(f"`fold_batch_norm=False` is not supported for {format}: the converter "
                         "would fold batch norms into the integer weights itself.")
    elif format == "onnx":
        from kquant.deploy.runtimes import export_onnx

        report = export_onnx(model, path)
    else:
        from kquant.deploy.runtimes import export_litert

        report = export_litert(model, path)
    report.update(format=format, path=str(path), file_bytes=os.path.getsize(path))
    return report


@click.command("export")
@click.argument("model_path", metavar="MODEL.keras", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default=None,
              help="kquant (.npz, bit-packed), onnx (int8 + DequantizeLinear) or litert "
                   "(int8 weights); default: from the output's suffix.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Output file (.npz, .onnx or .tflite).")
@click.option("--fold-batch-norm/--no-fold-batch-norm", default=None,
              help="Fold BatchNorm into the quantized layer before it (always on for onnx "
                   "and litert; off by default for kquant, whose file is bit-identical).")
def export_command(model_path, fmt, output, fold_batch_norm):
    """Export a trained model as a real low-bit file."""
    try:
        fmt = fmt or format_for(output)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'-o' / '--output'") from None
    if not str(output).lower().endswith(FORMATS[fmt]):
        raise click.BadParameter(f"{output!r} must end with {FORMATS[fmt]} for --format {fmt}.",
                                 param_hint="'-o' / '--output'")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise click.BadParameter(f"folder {folder!r} does not exist.", param_hint="'-o' / '--output'")
    import keras

    import kquant

    kquant.register_serializables()

    try:
        model = keras.saving.load_model(model_path)
    except Exception as e:  # noqa: BLE001
        raise click.ClickException(f"cannot load {model_path!r}: {type(e).__name__}: {e}") from e
    try:
        report = export_model(model, output, fmt, fold_batch_norm)
    except (ImportError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"exported {output} ({fmt}): {report['file_bytes']:,} bytes")
    from kquant.alq.layers import alq_layers

    if fmt == "kquant" and alq_layers(model) and not fold_batch_norm:
        from kquant.deploy.alq_storage import alq_storage_report, format_alq_storage

        click.echo(format_alq_storage(alq_storage_report(model, output)))
    for row in report.get("rows", report.get("kernels", [])):
        packed = f", {row['packed_bytes']:,} B packed" if "packed_bytes" in row else ""
        click.echo(f"  {row['layer']}: {row['bits']:g} bits, {row.get('weights', '?')} weights{packed}")
