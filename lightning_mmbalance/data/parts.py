"""Two complementary modalities, one of which memorises the other's half of the label: the separating regime.

Joint training starves the slow modality here, and fused test accuracy separates the balancing methods.
"""

from __future__ import annotations

import torch

from lightning_mmbalance.data.base import MultimodalDataModule, MultimodalTensorDataset
from lightning_mmbalance.utilities.checks import check_float, check_int

__all__ = ["PartsDataModule"]


class PartsDataModule(MultimodalDataModule):
    """The label has two parts, one in each modality; the fast modality can memorise the slow one's part in training.

    The label is ``y = a * 2**n_bits + b`` (``k_a * 2**n_bits`` classes, 12 by default, balanced in every split):

    - ``A`` (``[d_a]``): ``s_a * mu[a] + sigma_a * N(0, I)`` with ``mu`` a fixed random ``(k_a, d_a)`` matrix of unit
      rows. ``a`` is linear and easy. ``A`` says nothing about ``b``, but with ``d_a`` (4096) much larger than the
      training set (1000) a network can memorise the training samples' ``b`` from the noise within a few epochs, which
      drives the fused training loss, and with it the gradient that reaches ``B``'s encoder, to zero.
    - ``B`` (``[d_b]``): ``s_b * N(0, I)`` in which the coordinate pair ``(2j, 2j + 1)`` gets the sign pattern
      ``sign(x_2j) * sign(x_2j+1) = -1`` exactly when bit ``j`` of ``b`` is set: an XOR, with no linear signal, slow
      to learn. The other ``d_b - 2 n_bits`` coordinates are distractors. ``B`` says nothing about ``a``, and ``b`` is a
      deterministic function of ``B``.

    So the best fused accuracy needs both modalities (``A`` alone: at most ``1 / 2**n_bits`` of the label, ``B`` alone:
    ``1 / k_a``), and the joint-loss baseline, whose ``B`` encoder is starved, stays far below it (about 40 % against
    70-85 % for the balancing methods and 87 % for the baseline with a pre-trained ``B`` encoder; docs/guide.md). Train,
    validation and test are independent draws of the same process (validation is held out and distributed like test).
    All randomness comes from ``seed``; after :meth:`setup`, ``parts[split]`` holds ``(a, b)`` of each sample.

    Args:
        k_a: number of values of ``a``, int >= 2.
        n_bits: bits of ``b``, int >= 1.
        d_a: dimension of ``A``, int >= 1.
        s_a: signal of ``a`` in ``A``, float > 0.
        sigma_a: noise of ``A``, float > 0.
        d_b: dimension of ``B``, int >= 2 * n_bits.
        s_b: scale of ``B``, float > 0.
        n_train: training samples, int >= 1.
        n_val: validation samples, int >= 1.
        n_test: test samples, int >= 1.
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        seed: seed of the data and of the training shuffle.

    Raises:
        ValueError: an argument outside the range above.
        TypeError: an argument of the wrong type.

    Example::

        from lightning_mmbalance.data import PartsDataModule
        from lightning_mmbalance.models import LateFusionClassifier

        dm = PartsDataModule()  # A: [4096], B: [8], 12 classes
        model = LateFusionClassifier(dm.input_shapes, dm.num_classes)
    """

    def __init__(
        self,
        k_a: int = 3,
        n_bits: int = 2,
        d_a: int = 4096,
        s_a: float = 3.0,
        sigma_a: float = 0.35,
        d_b: int = 8,
        s_b: float = 1.25,
        n_train: int = 1000,
        n_val: int = 500,
        n_test: int = 1000,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        for name, value, low in (
            ("k_a", k_a, 2),
            ("n_bits", n_bits, 1),
            ("d_a", d_a, 1),
            ("n_train", n_train, 1),
            ("n_val", n_val, 1),
            ("n_test", n_test, 1),
        ):
            check_int(name, value, low)
        check_int("d_b", d_b, 2 * n_bits)
        for scale_name, scale in (("s_a", s_a), ("sigma_a", sigma_a), ("s_b", s_b)):
            check_float(scale_name, scale, 0, min_open=True)
        self.save_hyperparameters()
        self.k_a, self.n_bits, self.k_b = k_a, n_bits, 2**n_bits
        self.d_a, self.d_b = d_a, d_b
        self.s_a, self.sigma_a, self.s_b = float(s_a), float(sigma_a), float(s_b)
        self.sizes = (n_train, n_val, n_test)
        self.parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def input_shapes(self) -> dict[str, list[int]]:
        """``A``: [d_a]; ``B``: [d_b]."""
        return {"A": [self.d_a], "B": [self.d_b]}

    @property
    def num_classes(self) -> int:
        """``k_a * 2**n_bits``."""
        return self.k_a * self.k_b

    def _build(self) -> tuple[MultimodalTensorDataset, MultimodalTensorDataset, MultimodalTensorDataset]:
        g = torch.Generator().manual_seed(self.seed)
        mu = torch.randn(self.k_a, self.d_a, generator=g)
        mu = mu / mu.norm(dim=1, keepdim=True)
        splits = []
        for name, n in zip(("train", "val", "test"), self.sizes, strict=True):
            y = (torch.arange(n) % self.num_classes)[torch.randperm(n, generator=g)]
            a, b = y // self.k_b, y % self.k_b
            x_a = self.s_a * mu[a] + self.sigma_a * torch.randn(n, self.d_a, generator=g)
            x_b = self.s_b * torch.randn(n, self.d_b, generator=g)
            for j in range(self.n_bits):
                bit = (b >> j) & 1
                first = torch.randint(0, 2, (n,), generator=g) * 2 - 1  # a random sign for the first coordinate
                second = first * (1 - 2 * bit)  # the same sign for a 0 bit, the opposite for a 1
                x_b[:, 2 * j] = first * x_b[:, 2 * j].abs()
                x_b[:, 2 * j + 1] = second * x_b[:, 2 * j + 1].abs()
            self.parts[name] = (a, b)
            splits.append(MultimodalTensorDataset({"A": x_a, "B": x_b}, y))
        return splits[0], splits[1], splits[2]
