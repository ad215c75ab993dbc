"""kquant-ewgs: EWGS (element-wise gradient scaling; Lee, Kim & Ham, CVPR 2021) for kquant.

* ``EWGS`` — the estimator ``g_xn = g_xq(1 + δ·sign(g_xq)(x_n − x_q))``
  (entry point ``kquant.estimators: ewgs``);
* ``EWGSQuantizer`` — learnable interval ``[l, u]``, weights ``2(x_q − ½)``,
  activations ``x_q`` (entry point ``kquant.quantizers: ewgs``);
* ``EWGSDense`` / ``EWGSConv2D`` — kquant layers with the learnable output scale;
* ``DeltaUpdate`` — the callback refreshing δ from a Hessian-trace estimate;
  ``estimate_deltas`` / ``hutchinson_trace`` — the same as functions.
"""

from kquant_ewgs.callbacks import DeltaUpdate
from kquant_ewgs.estimator import EWGS
from kquant_ewgs.hessian import DeltaEstimate, estimate_deltas, ewgs_estimators, hutchinson_trace
from kquant_ewgs.layers import EWGSConv2D, EWGSDense, OutputScaleMixin
from kquant_ewgs.quantizer import EWGSQuantizer

__version__ = "0.1.0"

__all__ = ["EWGS", "DeltaEstimate", "DeltaUpdate", "EWGSConv2D", "EWGSDense", "EWGSQuantizer",
           "OutputScaleMixin", "estimate_deltas", "ewgs_estimators", "hutchinson_trace"]
