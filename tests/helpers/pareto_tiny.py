"""MMPareto's official model shape in miniature (separate unimodal heads), float64; module level for ddp_fork."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_mmbalance import MultimodalOutput, multimodal_loss


class ParetoTiny(pl.LightningModule):
    def __init__(self, seed: int = 0, batchnorm: bool = True, num_classes: int = 3, lr: float = 2e-3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        norm = (lambda: nn.BatchNorm1d(4)) if batchnorm else nn.Tanh
        self.audio_net = nn.Sequential(nn.Linear(3, 4), norm())
        self.visual_net = nn.Sequential(nn.Linear(3, 4), norm())
        self.head = nn.Linear(8, num_classes)
        self.head_audio = nn.Linear(4, num_classes)
        self.head_video = nn.Linear(4, num_classes)
        self.lr = lr
        self.captured: dict[str, Tensor] = {}
        self.double()

    def forward(self, batch: Any) -> MultimodalOutput:
        (x_a, x_v), y = batch
        a, v = self.audio_net(x_a), self.visual_net(x_v)
        return MultimodalOutput(
            self.head(torch.cat((a, v), 1)), {"audio": self.head_audio(a), "visual": self.head_video(v)}, y
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return multimodal_loss(self, self(batch))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.captured = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)


class PairData(torch.utils.data.Dataset):
    def __init__(self, n: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x_a = torch.randn(n, 3, generator=g, dtype=torch.float64)
        self.x_v = torch.randn(n, 3, generator=g, dtype=torch.float64)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[tuple[Tensor, Tensor], Tensor]:
        return (self.x_a[i], self.x_v[i]), self.y[i]


class PairDataModule(pl.LightningDataModule):
    def __init__(self, n: int = 12, batch_size: int = 6, seed: int = 0) -> None:
        super().__init__()
        self.data = PairData(n, seed)
        self.batch_size = batch_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            sampler = torch.utils.data.DistributedSampler(
                self.data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
            )
        return torch.utils.data.DataLoader(self.data, batch_size=self.batch_size, sampler=sampler)
