"""Synthetic imbalanced modalities: class-conditional Gaussian vectors with per-modality signal strength."""

from __future__ import annotations

import torch

from lightning_mmbalance.data.base import MultimodalDataModule, MultimodalTensorDataset
from lightning_mmbalance.utilities.checks import check_float, check_int

__all__ = ["SyntheticDataModule"]


class SyntheticDataModule(MultimodalDataModule):
    """N modalities ``m0, m1, ...`` of class-conditional vectors, one strong and the others weaker.

    For modality m, ``x = signal[m] * mu_m[y] + noise * N(0, I)``, with ``mu_m`` a fixed random
    ``(num_classes, dim)`` matrix of unit-norm class means. A larger signal makes a modality easier, so it learns
    faster and dominates joint training. Every split has balanced labels (class counts differ by at most one). All
    randomness comes from ``seed``: the same seed gives identical tensors.

    Args:
        num_modalities: number of modalities, >= 2.
        signal: per-modality signal strength, ``num_modalities`` non-negative numbers; None gives
            ``linspace(3, 1, num_modalities)`` (``[3.0, 1.0]`` for two modalities).
        dim: vector dimension per modality, >= 1.
        num_classes: number of classes, >= 2.
        n_train: training samples, >= 1.
        n_val: held-out validation samples, >= 1.
        n_test: test samples, >= 1.
        noise: standard deviation of the Gaussian noise, > 0.
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        seed: seed of the class means, the samples and the training shuffle.

    Example::

        from lightning_mmbalance.data import SyntheticDataModule
        from lightning_mmbalance.models import LateFusionClassifier

        dm = SyntheticDataModule(num_modalities=3)  # signal [3.0, 2.0, 1.0]
        model = LateFusionClassifier(dm.input_shapes, dm.num_classes)
    """

    def __init__(
        self,
        num_modalities: int = 2,
        signal: list[float] | None = None,
        dim: int = 32,
        num_classes: int = 4,
        n_train: int = 1024,
        n_val: int = 256,
        n_test: int = 512,
        noise: float = 1.0,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        for name, value, low in (
            ("num_modalities", num_modalities, 2),
            ("dim", dim, 1),
            ("num_classes", num_classes, 2),
            ("n_train", n_train, 1),
            ("n_val", n_val, 1),
            ("n_test", n_test, 1),
        ):
            check_int(name, value, low)
        if signal is None:
            signal = torch.linspace(3.0, 1.0, num_modalities).tolist()
        if len(signal) != num_modalities or any(s < 0 for s in signal):
            raise ValueError(
                f"`signal` must list {num_modalities} non-negative strengths (one per modality), got {signal!r}."
            )
        check_float("noise", noise, 0, min_open=True)
        self.save_hyperparameters()
        self.signal = [float(s) for s in signal]
        self.dim = dim
        self._num_classes = num_classes
        self.sizes = (n_train, n_val, n_test)
        self.noise = float(noise)

    @property
    def input_shapes(self) -> dict[str, list[int]]:
        """``m<i>``: [dim]."""
        return {f"m{i}": [self.dim] for i in range(len(self.signal))}

    @property
    def num_classes(self) -> int:
        """The number of classes."""
        return self._num_classes

    def _build(self) -> tuple[MultimodalTensorDataset, MultimodalTensorDataset, MultimodalTensorDataset]:
        g = torch.Generator().manual_seed(self.seed)
        means = []
        for _ in self.signal:
            mu = torch.randn(self._num_classes, self.dim, generator=g)
            means.append(mu / mu.norm(dim=1, keepdim=True))
        splits = []
        for n in self.sizes:
            y = torch.arange(n) % self._num_classes
            y = y[torch.randperm(n, generator=g)]
            inputs = {
                m: s * mu[y] + self.noise * torch.randn(n, self.dim, generator=g)
                for m, s, mu in zip(self.input_shapes, self.signal, means, strict=True)
            }
            splits.append(MultimodalTensorDataset(inputs, y))
        return splits[0], splits[1], splits[2]
