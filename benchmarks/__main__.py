"""``python -m benchmarks`` from the repository root: the packaged suite's CLI."""

from kquant.benchmarks.__main__ import main

if __name__ == "__main__":
    main(prog_name="python -m benchmarks")
