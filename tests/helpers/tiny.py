"""Tiny deterministic models, data and callbacks shared by the tests (module level, so ddp_spawn can pickle them)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_mmbalance import BalancingCallback, MultimodalOutput, multimodal_loss
from lightning_mmbalance.callbacks.base import StepStatistics
from lightning_mmbalance.contract import StepRecord
from lightning_mmbalance.data import MultimodalTensorDataset as TensorPairs


def make_data(n: int = 64, dims: Mapping[str, int] | None = None, num_classes: int = 3, seed: int = 0) -> TensorPairs:
    """Class-conditional vectors; modality "a" is strong, the others weak."""
    dims = dims or {"a": 4, "b": 6}
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    inputs = {}
    for i, (m, d) in enumerate(dims.items()):
        means = torch.randn(num_classes, d, generator=g)
        signal = 2.0 if i == 0 else 0.5
        inputs[m] = signal * means[y] + torch.randn(n, d, generator=g)
    return TensorPairs(inputs, y)


class TinyData(pl.LightningDataModule):
    """Unshuffled loaders; under DDP rank r takes samples r, r + world, ... (pass use_distributed_sampler=False)."""

    def __init__(self, n: int = 64, batch_size: int = 8, dims: Mapping[str, int] | None = None, with_val: bool = True):
        super().__init__()
        self.train_set = make_data(n, dims)
        self.val_set = make_data(max(n // 2, 8), dims, seed=1)
        self.batch_size = batch_size
        self.with_val = with_val

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            sampler = DistributedSampler(
                self.train_set, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
            )
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False, sampler=sampler)

    def val_dataloader(self) -> DataLoader | list:
        if not self.with_val:
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size)


class TinyModel(pl.LightningModule):
    """Linear+tanh encoders, one concat head with the bias split equally; float64 by default for exact comparisons."""

    def __init__(
        self,
        dims: Mapping[str, int] | None = None,
        num_classes: int = 3,
        feature_dim: int = 5,
        lr: float = 0.1,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        seed: int = 0,
        call_loss: bool = True,
        encoder_attr: str = "encoders",
    ) -> None:
        super().__init__()
        dims = dict(dims or {"a": 4, "b": 6})
        torch.manual_seed(seed)
        self.encoder_attr = encoder_attr
        encoders = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(d, feature_dim), nn.Tanh(), nn.Linear(feature_dim, feature_dim))
                for m, d in dims.items()
            }
        )
        setattr(self, encoder_attr, encoders)
        self.head = nn.Linear(feature_dim * len(dims), num_classes)
        self.feature_dim = feature_dim
        self.lr, self.optimizer_name, self.momentum = lr, optimizer, momentum
        self.call_loss = call_loss
        self.double()

    def forward(self, batch: Any) -> MultimodalOutput:
        inputs, targets = batch
        feats = {m: enc(inputs[m].to(self.dtype)) for m, enc in getattr(self, self.encoder_attr).items()}
        logits = self.head(torch.cat(list(feats.values()), dim=1))
        d, n = self.feature_dim, len(feats)
        uni = {
            m: f @ self.head.weight[:, i * d : (i + 1) * d].T + self.head.bias / n
            for i, (m, f) in enumerate(feats.items())
        }
        return MultimodalOutput(logits=logits, unimodal_logits=uni, targets=targets, features=feats)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        output = self(batch)
        if not self.call_loss:
            return nn.functional.cross_entropy(output.logits, output.targets)
        return multimodal_loss(self, output)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", multimodal_loss(self, self(batch)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class ShareCallback(BalancingCallback):
    """A trivial method: scales each encoder's gradient by 2 x its share of the summed true-class probability."""

    method = "share"
    gradient_action = "scale"

    def __init__(self, modulate: str = "gradient", encoders: Mapping[str, str] | None = None, weights: bool = False):
        super().__init__(encoders=encoders, modulate=modulate)
        self.seen: list[list[float]] = []
        self.sets_weights = weights

    @property
    def sets_loss_weights(self) -> bool:  # type: ignore[override]
        return self.sets_weights

    def loss_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        return dict.fromkeys(self.modalities, 0.5) if self.sets_weights else None

    def step_statistics(self, record: StepRecord) -> dict[str, Tensor]:
        y = record.output.targets.unsqueeze(1)
        probs = [
            torch.softmax(record.output.unimodal_logits[m].double(), 1).gather(1, y).sum() for m in self.modalities
        ]
        return {"prob": torch.stack(probs)}

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: StepStatistics) -> None:
        values = stats["prob"]
        self.seen.append(values)
        total = sum(values)
        factors = {m: 2 * v / total for m, v in zip(self.modalities, values, strict=True)}
        for m in self.modalities:
            params = self.encoder_parameters(m)
            if self.modulate == "update":
                self.scale_update_after_step(params, [factors[m]] * len(params))
            else:
                torch._foreach_mul_([p.grad for p in params], factors[m])
        self.log_values(pl_module, {"factor": factors})


class SaveParams(pl.Callback):
    """Saves every rank's parameters at the end of training to ``<folder>/rank<r>.pt``."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        log_every_n_steps=1,
    )
    kwargs.update(overrides)
    return kwargs


def fit(callbacks: list, model: pl.LightningModule | None = None, data: Any = None, **overrides: Any):
    """Train ``model`` (default ``TinyModel()``) on ``data`` (default ``TinyData()``); returns (trainer, model)."""
    trainer = pl.Trainer(**trainer_kwargs(callbacks=list(callbacks), **overrides))  # the Trainer appends to the list
    model = model if model is not None else TinyModel()
    trainer.fit(model, datamodule=data if data is not None else TinyData())
    return trainer, model


def params_of(model: torch.nn.Module) -> dict[str, Tensor]:
    """A detached copy of the module's state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_ranks(folder: str | os.PathLike, world_size: int = 2) -> list[dict[str, Tensor]]:
    return [torch.load(Path(folder) / f"rank{r}.pt") for r in range(world_size)]


def assert_states_close(a: Mapping[str, Tensor], b: Mapping[str, Tensor], atol: float = 1e-10) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda s, k=k: f"{k}: {s}")
