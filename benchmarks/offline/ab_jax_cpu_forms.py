"""A/B of the quantizers' JAX-CPU forms against the forms every other backend uses.

``kquant.xla.ynn_reduces()`` picks, under JAX's XLA:CPU, reductions that its
YNNPACK fusions take whole (DoReFa's ``max|tanh W|`` and tie count, HTGE's
step-gradient terms, TWN's masked mean). This script builds each Dense 2048 model
twice, once traced with those forms and once with the others, and times all of them
interleaved in one process against the float layer (``compare_step_times``; SGD,
MSE, batch 128, as the overhead benchmark). Run from the repository root:

    KERAS_BACKEND=jax python benchmarks/offline/ab_jax_cpu_forms.py [TIMED_STEPS]
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

from kquant import runtime  # noqa: E402

runtime.configure_malloc()   # as `python -m benchmarks` runs

import numpy as np  # noqa: E402

import kquant.quantizers.dorefa  # noqa: E402,F401
import kquant.quantizers.ternary  # noqa: E402,F401
import kquant.quantizers.uniform  # noqa: E402,F401
from kquant.benchmarks import overhead  # noqa: E402
from kquant.benchmarks.common import compare_step_times, timed_fit_steps  # noqa: E402

# the modules that read `ynn_reduces` (each binds its own name; reductions' serves
# `max_abs`, `count_of_max` and `written_once`, the last for HTGE's and TWN's sums)
MODULES = [sys.modules[name] for name in (
    "kquant.reductions", "kquant.quantizers.dorefa", "kquant.quantizers.ternary")]
ROWS = [("float", "float", None), ("floor_tanh_w", "floor_tanh_w", None),
        ("floor_pass_w", "floor_pass_w", None)] + [
    (f"{variant}:{form}", variant, form == "jax_cpu")
    for variant in ("dorefa2_w", "uniform2_w_htge", "twn_w") for form in ("others", "jax_cpu")]


def main(steps=120):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 2048)).astype("float32")
    y = rng.standard_normal((128, 2048)).astype("float32")
    original = MODULES[0].ynn_reduces
    models = {}
    for label, variant, forms in ROWS:
        model = overhead._model("dense", (2048, 2048), overhead.VARIANTS[variant], False, jit=True)
        for module in MODULES:
            module.ynn_reduces = original if forms is None else (lambda v=forms: v)
        timed_fit_steps(model, x, y, 128, 3)   # traced and compiled with these forms
        models[label] = model
    for module in MODULES:
        module.ynn_reduces = original
    times = compare_step_times(models, x, y, 128, steps=steps)
    print("| model | step_ms | time_vs_float |\n|---|---|---|")
    for label, seconds in times.items():
        print(f"| {label} | {seconds * 1e3:.2f} | {seconds / times['float']:.3f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 120)
