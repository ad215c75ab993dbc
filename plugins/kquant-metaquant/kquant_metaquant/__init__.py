"""kquant-metaquant: MetaQuant (Chen, Wang & Pan, NeurIPS 2019) as a kquant plugin.

* estimators ``metaquant`` (``meta_network=`` one of ``fcgrad``, ``multifc``,
  ``lstmfc``) and the named shortcuts ``fcgrad``, ``multifc``, ``lstmfc``,
  registered in the ``kquant.estimators`` entry-point group;
* :class:`MetaQuant`, the model wrapper whose train step shares one meta
  network across layers and trains it through the late weight update.
"""

from kquant_metaquant.calibration import MetaView, meta_view
from kquant_metaquant.estimators import FCGrad, LSTMFC, MetaQuantEstimator, MultiFC
from kquant_metaquant.meta_networks import (
    FCGradNetwork,
    LSTMFCNetwork,
    MetaNetwork,
    MultiFCNetwork,
    build_meta_network,
)
from kquant_metaquant.trainer import MetaQuant, find_meta_kernels

__version__ = "0.1.0"

__all__ = [
    "FCGrad", "FCGradNetwork", "LSTMFC", "LSTMFCNetwork", "MetaNetwork", "MetaQuant",
    "MetaQuantEstimator", "MetaView", "MultiFC", "MultiFCNetwork", "build_meta_network",
    "find_meta_kernels", "meta_view",
]
