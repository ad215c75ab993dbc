"""``kquant bench NAME ...``: the benchmark suite shipped in :mod:`kquant.benchmarks`.

Forwards every argument to the suite's CLI (``python -m kquant.benchmarks``),
so it works from any folder of a plain ``pip install``.
"""

from __future__ import annotations

import click


@click.command(
    "bench",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_command(args):
    """Run benchmarks of the kquant suite (`kquant bench --help` lists the options)."""
    from kquant.benchmarks.__main__ import main as harness

    return harness.main(args=list(args), prog_name="kquant bench", standalone_mode=False)


__all__ = ["bench_command"]
