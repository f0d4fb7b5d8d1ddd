"""Balanced multimodal learning as PyTorch Lightning callbacks."""

from lightning_mmbalance.callbacks import (
    ARL,
    OGMGE,
    BalancingCallback,
    DiagnosingRelearning,
    GradientBlending,
    MMPareto,
    ModalityMonitor,
)
from lightning_mmbalance.contract import MultimodalOutput, multimodal_loss
from lightning_mmbalance.fusion import ConcatFusion, SumFusion, ZeroMaskFusion

__version__ = "0.1.0.dev0"

__all__ = [
    "ARL",
    "OGMGE",
    "BalancingCallback",
    "ConcatFusion",
    "DiagnosingRelearning",
    "GradientBlending",
    "MMPareto",
    "ModalityMonitor",
    "MultimodalOutput",
    "SumFusion",
    "ZeroMaskFusion",
    "__version__",
    "multimodal_loss",
]
