"""CG-Digits: colored-and-gray digits, the CG-MNIST construction on scikit-learn's bundled handwritten digits."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from lightning_mmbalance.data.base import MultimodalDataModule, MultimodalTensorDataset
from lightning_mmbalance.utilities.checks import check_float

__all__ = ["NUM_DIGITS", "PALETTE", "CGDigitsDataModule"]

NUM_DIGITS = 1797
"""Number of images in ``sklearn.datasets.load_digits``."""

PALETTE = np.array(
    [
        [1.0, 0.0, 0.0],  # red
        [1.0, 0.5, 0.0],  # orange
        [0.5, 1.0, 0.0],  # chartreuse
        [0.0, 1.0, 0.0],  # green
        [0.0, 1.0, 0.5],  # spring green
        [0.5, 1.0, 1.0],  # light cyan
        [0.0, 0.5, 1.0],  # azure
        [0.0, 0.0, 1.0],  # blue
        [0.5, 0.0, 1.0],  # violet
        [1.0, 0.0, 0.5],  # rose
    ],
    dtype=np.float32,
)
"""One RGB colour per class (row = class). Any two differ in hue by at least 26 degrees (angle between RGB vectors)."""


class CGDigitsDataModule(MultimodalDataModule):
    """Colored-and-gray digits: two views of the same handwritten digit, one with a training-only colour shortcut.

    Built on the 1,797 real 8x8 images of ``sklearn.datasets.load_digits`` (bundled; nothing is downloaded), after
    the CG-MNIST construction of Wu et al., "Characterizing and overcoming the greedy nature of learning in
    multi-modal deep neural networks" (ICML 2022), also used by Wei & Hu, "MMPareto: Boosting Multimodal Learning
    with Innocent Unimodal Assistance" (ICML 2024). Modalities, in order:

    - ``gray``: the digit, ``(1, 8, 8)``, pixel / 16 in ``[0, 1]``.
    - ``color``: the same digit multiplied by an RGB colour of :data:`PALETTE`, ``(3, 8, 8)``. In the training split
      the colour is the class's colour with probability ``color_correlation`` and otherwise a colour drawn uniformly
      from the palette (which is the class colour one time in ten); in the validation and test splits it is always
      drawn uniformly, independent of the label.

    So colour is a shortcut that dominates training but does not generalise, and shape (shared by both views) is what
    generalises. The images are exact (no noise). The train/val/test split is stratified by label; validation is held
    out of the training data. All randomness comes from ``seed``: the same seed gives identical tensors.

    After :meth:`setup`, ``split_indices[split]`` holds the original ``load_digits`` index of each sample of that
    split (in dataset order) and ``colors[split]`` the palette index of its colour.

    Args:
        color_correlation: probability that a training digit gets its class colour, in ``[0, 1]``.
        val_fraction: fraction of all samples held out for validation, > 0.
        test_fraction: fraction of all samples in the test split, > 0; ``val_fraction + test_fraction < 1`` and
            every split must get at least 10 samples (one per class).
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        seed: seed of the split, the colours and the training shuffle.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mmbalance import OGMGE
        from lightning_mmbalance.data import CGDigitsDataModule
        from lightning_mmbalance.models import LateFusionClassifier

        dm = CGDigitsDataModule(color_correlation=0.9)
        model = LateFusionClassifier(dm.input_shapes, dm.num_classes)
        Trainer(max_epochs=15, callbacks=[OGMGE()]).fit(model, datamodule=dm)
    """

    def __init__(
        self,
        color_correlation: float = 0.9,
        val_fraction: float = 0.15,
        test_fraction: float = 0.25,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        check_float("color_correlation", color_correlation, 0, 1)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            check_float(name, value, 0, 1, min_open=True, max_open=True)
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"`val_fraction + test_fraction` must be < 1, got {val_fraction} + {test_fraction}.")
        n_val, n_test = round(val_fraction * NUM_DIGITS), round(test_fraction * NUM_DIGITS)
        sizes = {"train": NUM_DIGITS - n_val - n_test, "val": n_val, "test": n_test}
        if min(sizes.values()) < self.num_classes:
            raise ValueError(
                f"Every split needs at least {self.num_classes} of the {NUM_DIGITS} samples (one per class), got "
                f"{sizes} from val_fraction={val_fraction}, test_fraction={test_fraction}."
            )
        self.save_hyperparameters()
        self.color_correlation = float(color_correlation)
        self.sizes = sizes
        self.split_indices: dict[str, np.ndarray] = {}
        self.colors: dict[str, np.ndarray] = {}

    @property
    def input_shapes(self) -> dict[str, list[int]]:
        """``gray``: [1, 8, 8]; ``color``: [3, 8, 8]."""
        return {"gray": [1, 8, 8], "color": [3, 8, 8]}

    @property
    def num_classes(self) -> int:
        """Ten digits."""
        return 10

    def _build(self) -> tuple[MultimodalTensorDataset, MultimodalTensorDataset, MultimodalTensorDataset]:
        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)
        labels = digits.target.astype(np.int64)
        rest, test = train_test_split(
            np.arange(len(labels)), test_size=self.sizes["test"], stratify=labels, random_state=self.seed
        )
        train, val = train_test_split(rest, test_size=self.sizes["val"], stratify=labels[rest], random_state=self.seed)
        rng = np.random.default_rng(self.seed)
        splits = {}
        for name, idx in (("train", train), ("val", val), ("test", test)):
            y = labels[idx]
            color_ids = rng.integers(0, len(PALETTE), size=len(idx))
            if name == "train":
                color_ids = np.where(rng.random(len(idx)) < self.color_correlation, y, color_ids)
            gray = images[idx][:, None]
            color = gray * PALETTE[color_ids][:, :, None, None]
            self.split_indices[name] = idx
            self.colors[name] = color_ids
            splits[name] = MultimodalTensorDataset(
                {"gray": torch.from_numpy(gray), "color": torch.from_numpy(color)}, torch.from_numpy(y)
            )
        return splits["train"], splits["val"], splits["test"]
