"""ALQ: adaptive loss-aware multi-bit quantization (Qu et al., CVPR 2020).

* :mod:`~kquant.alq.sketching` — Alg. 1, float weights → binary bases.
* :mod:`~kquant.alq.layers` — :class:`ALQDense`, :class:`ALQConv2D` (``ŵ = Bα``).
* :mod:`~kquant.alq.optimizer` — :class:`ALQ` (also ``kquant.optimizers.ALQ``), Alg. 3–4.
* :mod:`~kquant.alq.pruning` — :class:`ALQPruning`, Alg. 2.
* :mod:`~kquant.alq.pipeline` — :class:`ALQSchedule` / :func:`fit_pipeline`, Alg. 5.
* :mod:`~kquant.alq.activations` — :class:`ALQActivation`, §4.
* :mod:`~kquant.alq.storage` — Eq. 26 storage table and the Fig. 2 plot.
* :mod:`~kquant.alq.convert` — :func:`quantize` a trained float model.
"""

from kquant.alq.activations import ALQActivation
from kquant.alq.layers import ALQConv2D, ALQDense, ALQLayer, alq_layers
from kquant.alq.optimizer import ALQ, PHASES
from kquant.alq.convert import quantize
from kquant.alq.pipeline import ALQSchedule, fit_pipeline
from kquant.alq.pruning import ALQPruning, PruningRun, average_bitwidth
from kquant.alq.sketching import sketch
from kquant.alq.storage import format_table, plot_bitwidths, storage_table

__all__ = ["ALQ", "ALQActivation", "ALQConv2D", "ALQDense", "ALQLayer", "ALQPruning",
           "ALQSchedule", "PHASES", "PruningRun", "alq_layers", "average_bitwidth", "fit_pipeline",
           "format_table", "plot_bitwidths", "quantize", "sketch", "storage_table"]
