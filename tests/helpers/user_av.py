"""A user's own audio-visual module and data module, as `mmbalance compare` meets them: the package never imports
this file. Batches are tuples ``(audio, visual, label)``; the fused head and the unimodal heads are separate."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mmbalance import MultimodalOutput, multimodal_loss


class AudioVisual(pl.LightningModule):
    """No validation or test step: the comparison measures the accuracies from the forward."""

    def __init__(self, hidden: int = 8, num_classes: int = 3, lr: float = 0.1, unimodal: bool = True):
        super().__init__()
        self.save_hyperparameters()
        self.encoders = nn.ModuleDict({"audio": nn.Linear(6, hidden), "visual": nn.Linear(4, hidden)})
        self.fusion_head = nn.Linear(2 * hidden, num_classes)
        self.heads = nn.ModuleDict({m: nn.Linear(hidden, num_classes) for m in self.encoders})

    def forward(self, batch):
        audio, visual, y = batch
        feats = {
            "audio": torch.relu(self.encoders["audio"](audio)),
            "visual": torch.relu(self.encoders["visual"](visual)),
        }
        unimodal = {m: self.heads[m](f) for m, f in feats.items()} if self.hparams.unimodal else {}
        logits = self.fusion_head(torch.cat([feats["audio"], feats["visual"]], dim=1))
        return MultimodalOutput(logits=logits, unimodal_logits=unimodal, targets=y, features=feats)

    def training_step(self, batch, batch_idx):
        return multimodal_loss(self, self(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class FixedLr(AudioVisual):
    """A module whose learning rate is not an init argument."""

    def __init__(self, hidden: int = 8):
        super().__init__(hidden=hidden)


class AVData(pl.LightningDataModule):
    def __init__(self, n: int = 96, batch_size: int = 16):
        super().__init__()
        self.save_hyperparameters()
        g = torch.Generator().manual_seed(0)
        y = torch.arange(n) % 3
        audio = 2.0 * torch.randn(3, 6, generator=g)[y] + torch.randn(n, 6, generator=g)
        visual = 0.5 * torch.randn(3, 4, generator=g)[y] + torch.randn(n, 4, generator=g)
        third = n // 3
        self.splits = {
            "train": TensorDataset(audio[:third], visual[:third], y[:third]),
            "val": TensorDataset(audio[third : 2 * third], visual[third : 2 * third], y[third : 2 * third]),
            "test": TensorDataset(audio[2 * third :], visual[2 * third :], y[2 * third :]),
        }

    def train_dataloader(self):
        return DataLoader(self.splits["train"], batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.splits["val"], batch_size=self.hparams.batch_size)

    def test_dataloader(self):
        return DataLoader(self.splits["test"], batch_size=self.hparams.batch_size)


class TrainOnly(pl.LightningDataModule):
    """A data module without validation and test loaders."""

    def train_dataloader(self):
        return AVData().train_dataloader()


class CallbackLog(pl.Callback):
    """Appends the Trainer's callback classes to a file at the end of every fit: the user's callbacks stay."""

    def __init__(self, path: str):
        self.path = path

    def on_fit_end(self, trainer, pl_module):
        with Path(self.path).open("a") as f:
            f.write(" ".join(type(c).__name__ for c in trainer.callbacks) + "\n")


class IgnoresLr(AudioVisual):
    """A module whose optimizer does not use its `lr` argument."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class TensorForward(AudioVisual):
    """A module outside the contract: its forward returns the fused logits only."""

    def forward(self, batch):
        return super().forward(batch).logits

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch), batch[2])
