"""The balancing callbacks and the ModalityMonitor."""

from lightning_mmbalance.callbacks.arl import ARL
from lightning_mmbalance.callbacks.base import BalancingCallback
from lightning_mmbalance.callbacks.gradient_blending import GradientBlending
from lightning_mmbalance.callbacks.mmpareto import MMPareto
from lightning_mmbalance.callbacks.monitor import ModalityMonitor
from lightning_mmbalance.callbacks.ogm_ge import OGMGE
from lightning_mmbalance.callbacks.relearning import DiagnosingRelearning

__all__ = [
    "ARL",
    "OGMGE",
    "BalancingCallback",
    "DiagnosingRelearning",
    "GradientBlending",
    "MMPareto",
    "ModalityMonitor",
]
