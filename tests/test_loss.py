"""``multimodal_loss``: the weighted loss, the step record, and a graph that DDP accepts at every step."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_mmbalance import GradientBlending, MultimodalOutput, multimodal_loss
from lightning_mmbalance.data import MultimodalTensorDataset
from tests.helpers.tiny import (
    SaveParams,
    ShareCallback,
    TinyModel,
    assert_states_close,
    fit,
    load_ranks,
    trainer_kwargs,
)


def test_loss_weights_reach_the_loss():
    """A callback's weights give w_f L_f + sum w_m L_m; the record holds each loss."""
    records = []

    class Spy(ShareCallback):
        def receive_record(self, record):
            records.append(record)
            super().receive_record(record)

    fit([Spy(weights=True)], max_steps=1)
    rec = records[0]
    expected = rec.fused_loss + 0.5 * rec.unimodal_losses["a"] + 0.5 * rec.unimodal_losses["b"]
    torch.testing.assert_close(rec.loss, expected)
    assert rec.weights == {"fused": 1.0, "a": 0.5, "b": 0.5}
    torch.testing.assert_close(
        rec.unimodal_losses["a"], nn.functional.cross_entropy(rec.output.unimodal_logits["a"], rec.output.targets)
    )


def test_without_balancing_callback_loss_is_fused():
    losses = []

    class Model(TinyModel):
        def training_step(self, batch, batch_idx):
            out = self(batch)
            loss = multimodal_loss(self, out)
            losses.append((loss, nn.functional.cross_entropy(out.logits, out.targets)))
            return loss

    fit([], model=Model(), max_steps=2)
    assert len(losses) == 2
    for got, want in losses:
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- a stable graph
class SeparateHeads(pl.LightningModule):
    """Separate unimodal heads: a head is reached only through its own unimodal loss (MMPareto's official model)."""

    def __init__(self, lr: float = 0.5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoders = nn.ModuleDict({"signal": nn.Linear(4, 8), "noise": nn.Linear(16, 8)})
        self.fused = nn.Linear(16, 3)
        self.heads = nn.ModuleDict({m: nn.Linear(8, 3) for m in self.encoders})
        self.lr = lr

    def forward(self, batch):
        inputs, y = batch
        features = {m: torch.relu(enc(inputs[m])) for m, enc in self.encoders.items()}
        logits = self.fused(torch.cat(list(features.values()), 1))
        return MultimodalOutput(logits, {m: self.heads[m](f) for m, f in features.items()}, y, features)

    def training_step(self, batch, batch_idx):
        return multimodal_loss(self, self(batch))

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", multimodal_loss(self, self(batch)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _signal_and_noise(n: int, seed: int) -> MultimodalTensorDataset:
    """The "signal" modality predicts the label; "noise" is independent of it, so a head can only memorise it."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    means = torch.randn(3, 4, generator=torch.Generator().manual_seed(7))
    inputs = {"signal": 2 * means[y] + torch.randn(n, 4, generator=g), "noise": torch.randn(n, 16, generator=g)}
    return MultimodalTensorDataset(inputs, y)


class SignalNoiseData(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.train_set, self.val_set = _signal_and_noise(24, 0), _signal_and_noise(48, 1)

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            sampler = DistributedSampler(
                self.train_set, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
            )
        return DataLoader(self.train_set, batch_size=4, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=16)


class WeightHistory(Callback):
    def __init__(self, blend: GradientBlending, folder=None) -> None:
        self.blend, self.folder, self.history = blend, folder, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.history.append(self.blend.weights)

    def on_train_end(self, trainer, pl_module):
        if self.folder is not None:
            torch.save(self.history, self.folder / f"weights{trainer.global_rank}.pt")


def test_zero_weight_keeps_its_term_in_the_graph():
    """A head whose weight is 0 still receives a gradient (all zeros) at every step."""
    grads = []

    class Capture(SeparateHeads):
        def on_before_optimizer_step(self, optimizer):
            grads.append({n: p.grad for n, p in self.named_parameters()})

    blend = GradientBlending(super_epoch=1, estimator="joint", encoders=None)
    history = WeightHistory(blend)
    pl.Trainer(**trainer_kwargs(callbacks=[blend, history], max_epochs=4, limit_val_batches=1.0)).fit(
        Capture(), datamodule=SignalNoiseData()
    )
    zero_steps = [i for i, w in enumerate(history.history) if w["noise"] == 0.0]
    assert zero_steps, history.history  # the noise head stopped generalising: clipped to weight 0
    for i in zero_steps:
        assert all(g is not None for g in grads[i].values())
        assert torch.count_nonzero(grads[i]["heads.noise.weight"]) == 0


@pytest.mark.ddp
def test_gradient_blending_under_default_ddp_survives_a_zero_weight(tmp_path):
    """Lightning's default DDP (find_unused_parameters=False) while a head's weight drops to 0 and comes back."""
    blend = GradientBlending(super_epoch=1, estimator="joint")
    kw = trainer_kwargs(
        callbacks=[blend, WeightHistory(blend, tmp_path), SaveParams(tmp_path)],
        max_epochs=4,
        limit_val_batches=1.0,
        strategy="ddp_fork",
        devices=2,
    )
    pl.Trainer(**kw).fit(SeparateHeads(), datamodule=SignalNoiseData())
    history = torch.load(tmp_path / "weights0.pt")
    assert any(w["noise"] == 0.0 for w in history) and history[0]["noise"] > 0
    assert history == torch.load(tmp_path / "weights1.pt")
    rank0, rank1 = load_ranks(tmp_path)
    assert_states_close(rank0, rank1, atol=0)


@pytest.mark.ddp
def test_plain_training_of_separate_heads_under_default_ddp(tmp_path):
    """No callback: the unimodal heads get zero-weighted terms, so DDP's default flags accept the module too."""
    kw = trainer_kwargs(callbacks=[SaveParams(tmp_path)], max_epochs=1, strategy="ddp_fork", devices=2)
    model = SeparateHeads()
    heads_before = {k: v.clone() for k, v in model.heads.state_dict().items()}
    pl.Trainer(**kw).fit(model, datamodule=SignalNoiseData())
    rank0, _ = load_ranks(tmp_path)
    for k, v in heads_before.items():  # weight 0: the heads do not move
        assert torch.equal(rank0[f"heads.{k}"], v)


def test_single_process_separate_heads_untouched_without_callbacks():
    model = SeparateHeads()
    heads_before = {k: v.clone() for k, v in model.heads.state_dict().items()}
    fit([], model=model, data=SignalNoiseData(), max_epochs=1)
    for k, v in heads_before.items():
        assert torch.equal(model.heads.state_dict()[k], v)
