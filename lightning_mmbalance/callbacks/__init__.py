"""The balancing callbacks, the uniform baseline and the ModalityMonitor, with their base classes."""

from lightning_mmbalance.callbacks.agm import AGM
from lightning_mmbalance.callbacks.arl import ARL
from lightning_mmbalance.callbacks.base import (
    BalancingCallback,
    DivergenceError,
    DivergenceWarning,
    MultimodalCallback,
    StepStatistics,
)
from lightning_mmbalance.callbacks.gradient_blending import GradientBlending
from lightning_mmbalance.callbacks.inforeg import InfoReg
from lightning_mmbalance.callbacks.mmpareto import MMPareto
from lightning_mmbalance.callbacks.monitor import ModalityMonitor
from lightning_mmbalance.callbacks.ogm_ge import OGMGE
from lightning_mmbalance.callbacks.opm import OPM
from lightning_mmbalance.callbacks.relearning import DiagnosingRelearning
from lightning_mmbalance.callbacks.unimodal_losses import UnimodalLosses

__all__ = [
    "AGM",
    "ARL",
    "OGMGE",
    "OPM",
    "BalancingCallback",
    "DiagnosingRelearning",
    "DivergenceError",
    "DivergenceWarning",
    "GradientBlending",
    "InfoReg",
    "MMPareto",
    "ModalityMonitor",
    "MultimodalCallback",
    "StepStatistics",
    "UnimodalLosses",
]
