"""The balancing callbacks, the uniform baseline and the ModalityMonitor, with their base classes."""

from lightning_mmbalance.callbacks.arl import ARL
from lightning_mmbalance.callbacks.base import BalancingCallback, MultimodalCallback, StepStatistics
from lightning_mmbalance.callbacks.gradient_blending import GradientBlending
from lightning_mmbalance.callbacks.mmpareto import MMPareto
from lightning_mmbalance.callbacks.monitor import ModalityMonitor
from lightning_mmbalance.callbacks.ogm_ge import OGMGE
from lightning_mmbalance.callbacks.relearning import DiagnosingRelearning
from lightning_mmbalance.callbacks.unimodal_losses import UnimodalLosses

__all__ = [
    "ARL",
    "OGMGE",
    "BalancingCallback",
    "DiagnosingRelearning",
    "GradientBlending",
    "MMPareto",
    "ModalityMonitor",
    "MultimodalCallback",
    "StepStatistics",
    "UnimodalLosses",
]
