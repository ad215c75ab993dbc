"""``kquant bench NAME ...``: the repository's benchmark suite from the kquant CLI.

The suite (``benchmarks/``) lives in the source checkout, not in the
installed package, so this command looks for it in the current working
directory and forwards every argument to its CLI (``python -m benchmarks``).
Wire it into the main CLI with ``main.add_command(bench_command, "bench")``.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import sys

import click


def find_benchmarks(root=None):
    """Import and return the ``benchmarks.__main__`` module of the checkout at ``root`` (cwd)."""
    root = pathlib.Path(root or os.getcwd()).resolve()
    package = root / "benchmarks"
    if not ((package / "__init__.py").is_file() and (package / "__main__.py").is_file()):
        raise click.ClickException(
            f"No benchmarks/ suite in {root}. `kquant bench` runs the benchmarks of a kquant "
            "source checkout: run it from the repository root (the folder containing "
            "benchmarks/ and pyproject.toml), e.g. `cd kquant && kquant bench estimators --quick`."
        )
    loaded = sys.modules.get("benchmarks")
    if loaded is not None:
        where = pathlib.Path(getattr(loaded, "__file__", "") or ".").resolve().parent
        if where != package:
            raise click.ClickException(
                f"Another package named 'benchmarks' is already imported (from {where}); "
                f"cannot load the kquant suite from {package}."
            )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks.__main__")


@click.command(
    "bench",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_command(args):
    """Run benchmarks of the repository's benchmarks/ suite (from the repository root).

    Same arguments as `python -m benchmarks`; `kquant bench --help` lists them.
    """
    harness = find_benchmarks()
    return harness.main.main(args=list(args), prog_name="kquant bench", standalone_mode=False)


__all__ = ["bench_command", "find_benchmarks"]
