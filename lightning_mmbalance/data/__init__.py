"""Built-in multimodal data: nothing is downloaded at run time."""

from lightning_mmbalance.data.base import MultimodalDataModule, MultimodalTensorDataset
from lightning_mmbalance.data.cg_digits import CGDigitsDataModule
from lightning_mmbalance.data.parts import PartsDataModule
from lightning_mmbalance.data.synthetic import SyntheticDataModule

__all__ = [
    "CGDigitsDataModule",
    "MultimodalDataModule",
    "MultimodalTensorDataset",
    "PartsDataModule",
    "SyntheticDataModule",
]
