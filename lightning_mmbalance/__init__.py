"""Balanced multimodal learning as PyTorch Lightning callbacks."""

from lightning_mmbalance.callbacks import (
    ARL,
    OGMGE,
    BalancingCallback,
    DiagnosingRelearning,
    GradientBlending,
    MMPareto,
    ModalityMonitor,
    MultimodalCallback,
    UnimodalLosses,
)
from lightning_mmbalance.contract import MultimodalOutput
from lightning_mmbalance.fusion import ConcatFusion, SumFusion, ZeroMaskFusion
from lightning_mmbalance.loss import multimodal_loss
from lightning_mmbalance.masking import masked_forward

__version__ = "0.2.0.dev0"

__all__ = [
    "ARL",
    "OGMGE",
    "BalancingCallback",
    "ConcatFusion",
    "DiagnosingRelearning",
    "GradientBlending",
    "MMPareto",
    "ModalityMonitor",
    "MultimodalCallback",
    "MultimodalOutput",
    "SumFusion",
    "UnimodalLosses",
    "ZeroMaskFusion",
    "__version__",
    "masked_forward",
    "multimodal_loss",
]
