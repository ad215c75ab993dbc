"""kquant-compat: Larq's and QKeras's quantizer names on kquant.

``kquant_compat.larq`` and ``kquant_compat.qkeras`` mirror those libraries'
import paths, so a model ports by changing its imports; the quantizer names
are also registered in kquant's ``kquant.quantizers`` entry-point group, so
``kquant.QuantDense(..., kernel_quantizer="ste_sign")`` works too.
"""

__version__ = "0.1.0"
