"""Repository-root alias of :mod:`kquant.benchmarks` (the suite ships inside the package).

``python -m benchmarks NAME ...`` from the repository root is ``kquant bench NAME ...``;
committed results live in ``benchmarks/results/``.
"""
