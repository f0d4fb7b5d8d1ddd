"""Dataset and DataModule base for the built-in multimodal data: batches are ``(inputs: dict, targets)``."""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_mmbalance.utilities.checks import check_int

__all__ = ["MultimodalDataModule", "MultimodalTensorDataset"]


class MultimodalTensorDataset(Dataset):
    """In-memory samples ``({modality: x[i]}, y[i])``.

    Args:
        inputs: modality -> ``(N, *shape)`` tensor, at least one modality.
        targets: ``(N,)`` integer class indices.

    Raises:
        ValueError: if there is no modality, or a modality's sample count differs from the number of targets.

    Example::

        >>> ds = MultimodalTensorDataset({"a": torch.zeros(3, 2), "b": torch.ones(3, 4)}, torch.tensor([0, 1, 0]))
        >>> x, y = ds[1]
        >>> sorted(x), int(y)
        (['a', 'b'], 1)
    """

    def __init__(self, inputs: Mapping[str, Tensor], targets: Tensor) -> None:
        if not inputs:
            raise ValueError("`inputs` must hold at least one modality, got none.")
        for m, x in inputs.items():
            if x.shape[0] != targets.shape[0]:
                raise ValueError(f"Modality {m!r} has {x.shape[0]} samples but there are {targets.shape[0]} targets.")
        self.inputs = dict(inputs)
        self.targets = targets

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[dict[str, Tensor], Tensor]:
        return {m: x[index] for m, x in self.inputs.items()}, self.targets[index]


class MultimodalDataModule(pl.LightningDataModule):
    """Base of the built-in data modules: train/val/test splits of :class:`MultimodalTensorDataset`.

    Subclasses implement ``_build`` (returning the three splits) and the ``input_shapes`` / ``num_classes``
    properties, which are known right after ``__init__`` (so LightningCLI can link them into the model). Each batch is
    ``(inputs, targets)``: ``inputs`` maps modality -> float32 ``(B, *shape)``, ``targets`` is int64 ``(B,)``.

    Args:
        batch_size: samples per batch, int >= 1.
        num_workers: DataLoader workers, int >= 0.
        seed: seed of the data generation and of the training shuffle order, int >= 0.

    Example::

        from lightning_mmbalance.data import CGDigitsDataModule
        from lightning_mmbalance.models import LateFusionClassifier

        dm = CGDigitsDataModule(batch_size=64)
        model = LateFusionClassifier(dm.input_shapes, dm.num_classes)
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0), ("seed", seed, 0)):
            check_int(name, value, low)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: MultimodalTensorDataset | None = None
        self.val_set: MultimodalTensorDataset | None = None
        self.test_set: MultimodalTensorDataset | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names, in order."""
        return tuple(self.input_shapes)

    @property
    def input_shapes(self) -> dict[str, list[int]]:
        """Modality -> per-sample input shape."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        raise NotImplementedError

    def _build(self) -> tuple[MultimodalTensorDataset, MultimodalTensorDataset, MultimodalTensorDataset]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build the three splits once (deterministic given ``seed``); later calls do nothing."""
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self._build()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        dataset: MultimodalTensorDataset = getattr(self, f"{split}_set")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """The training split, shuffled reproducibly (the shuffle generator is seeded from ``seed``)."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The held-out validation split, in order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The test split, in order."""
        return self._loader("test", shuffle=False)
