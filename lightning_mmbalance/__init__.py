"""Balanced multimodal learning as PyTorch Lightning callbacks."""

from lightning_mmbalance.callbacks import (
    AGM,
    ARL,
    OGMGE,
    OPM,
    BalancingCallback,
    DiagnosingRelearning,
    DivergenceError,
    DivergenceWarning,
    GradientBlending,
    InfoReg,
    MMPareto,
    ModalityMonitor,
    MultimodalCallback,
    UnimodalLosses,
)
from lightning_mmbalance.contract import MultimodalOutput
from lightning_mmbalance.fusion import ConcatFusion, SumFusion, ZeroMaskFusion
from lightning_mmbalance.loss import multimodal_loss
from lightning_mmbalance.masking import masked_forward

__version__ = "0.3.0.dev0"

__all__ = [
    "AGM",
    "ARL",
    "OGMGE",
    "OPM",
    "BalancingCallback",
    "ConcatFusion",
    "DiagnosingRelearning",
    "DivergenceError",
    "DivergenceWarning",
    "GradientBlending",
    "InfoReg",
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
