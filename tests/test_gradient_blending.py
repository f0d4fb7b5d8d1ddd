import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from lightning_mmbalance import GradientBlending, MultimodalOutput, multimodal_loss
from lightning_mmbalance.functional import gblend_weights
from tests.helpers.tiny import (
    SaveParams,
    TensorPairs,
    TinyData,
    TinyModel,
    assert_states_close,
    load_ranks,
    trainer_kwargs,
)

HEADS = ("audio", "visual", "fused")


def d(*values):
    return dict(zip(HEADS, values, strict=True))


# ---------------------------------------------------------------------------------------------- G1-G3
G1 = (d(1.60, 1.75, 1.55), d(1.70, 1.78, 1.65), d(0.90, 1.30, 0.60), d(1.40, 1.45, 1.25))


def test_g1_weight_formula():
    w = gblend_weights(*G1, eps=0)
    assert list(w.values()) == pytest.approx([0.0718006198, 0.8775631305, 0.0506362498], abs=1e-9)
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-12)
    assert list(gblend_weights(*G1).values()) == pytest.approx([0.0718006198, 0.8775631305, 0.0506362498], abs=1e-6)


def test_g2_negative_generalisation():
    val_end = d(1.80, 1.45, 1.25)
    clip = gblend_weights(G1[0], G1[1], G1[2], val_end, policy="clip", eps=0)
    absolute = gblend_weights(G1[0], G1[1], G1[2], val_end, policy="abs", eps=0)
    assert list(clip.values()) == pytest.approx([0, 0.9454467964, 0.0545532036], abs=1e-9)
    assert list(absolute.values()) == pytest.approx([0.0064049404, 0.9393912660, 0.0542037936], abs=1e-9)


@pytest.mark.parametrize("policy", ["clip", "abs"])
def test_g3_summed_losses(policy):
    w = gblend_weights(
        d(15.0, 17.0, 14.0), d(4.8, 5.16, 4.65), d(8.0, 12.0, 5.0), d(4.35, 4.5, 3.9), policy=policy, eps=0
    )
    assert list(w.values()) == pytest.approx([0.1854859523, 0.6196487628, 0.1948652849], abs=1e-9)


def test_all_zero_gives_uniform():
    same = d(1.0, 1.0, 1.0)
    assert gblend_weights(same, same, same, same) == pytest.approx(d(1 / 3, 1 / 3, 1 / 3))


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((d(1, 1, 1), d(1, 1, 1), d(1, 1, 1), {"a": 1, "b": 1}), {}, "must have the same heads"),
        (({"a": 1}, {"a": 1}, {"a": 1}, {"a": 1}), {}, "at least 2 heads"),
        ((d(math.nan, 1, 1), d(1, 1, 1), d(1, 1, 1), d(1, 1, 1)), {}, "must be finite"),
        (G1, {"policy": "square"}, r"`policy` must be one of \('clip', 'abs'\), got 'square'"),
        (G1, {"eps": -1.0}, "`eps` must be a finite float >= 0, got -1.0"),
        ((d(1, 1, 1), d(2, 1, 1), d(0.5, 1, 1), d(1.5, 1, 1)), {"eps": 0}, "'audio' has dO = 0 and G > 0 with eps = 0"),
    ],
)
def test_functional_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gblend_weights(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- G4: end to end
def g4_data():
    i = torch.arange(12, dtype=torch.float64)
    y = torch.arange(12) % 3
    angle = 2 * math.pi * y.double() / 3
    x_a = torch.stack([torch.cos(angle) + 0.8 * torch.sin(1.7 * i), torch.sin(angle) + 0.8 * torch.cos(2.3 * i)], 1)
    x_v = torch.stack(
        [0.4 * torch.cos(angle) + 0.8 * torch.cos(1.1 * i), 0.4 * torch.sin(angle) + 0.8 * torch.sin(0.7 * i + 1)], 1
    )
    return x_a, x_v, y


class G4Data(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        x_a, x_v, y = g4_data()
        self.train = TensorPairs({"audio": x_a[:8], "visual": x_v[:8]}, y[:8])
        self.val = TensorPairs({"audio": x_a[8:], "visual": x_v[8:]}, y[8:])

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=8)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=4)


class G4Model(pl.LightningModule):
    """Identity encoders, zero-initialised separate heads; SGD(0.5)."""

    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict({"audio": nn.Identity(), "visual": nn.Identity()})
        self.heads = nn.ModuleDict({"audio": nn.Linear(2, 3), "visual": nn.Linear(2, 3), "fused": nn.Linear(4, 3)})
        for p in self.parameters():
            nn.init.zeros_(p)
        self.double()
        self.records = []

    def forward(self, batch):
        x, y = batch
        uni = {m: self.heads[m](x[m]) for m in ("audio", "visual")}
        return MultimodalOutput(self.heads["fused"](torch.cat([x["audio"], x["visual"]], 1)), uni, y)

    def training_step(self, batch, batch_idx):
        return multimodal_loss(self, self(batch))

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", multimodal_loss(self, self(batch)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Probe(GradientBlending):
    """Records every mean-loss measurement."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.measured = []

    def _mean_losses(self, trainer, module, view, max_batches):
        out = super()._mean_losses(trainer, module, view, max_batches)
        self.measured.append(out)
        return out


def g4_trainer(cb, **kw):
    args = trainer_kwargs(callbacks=[cb], max_epochs=1, limit_val_batches=1.0)
    args.update(kw)
    return pl.Trainer(**args)


def test_g4_copies_end_to_end():
    cb = Probe(mode="offline", estimation_epochs=5)
    g4_trainer(cb, max_steps=1).fit(G4Model(), datamodule=G4Data())
    ln3 = math.log(3)
    train_start, val_start = cb.measured[0], cb.measured[1]
    for h in HEADS:
        assert train_start[h] == pytest.approx(ln3, abs=1e-10) and val_start[h] == pytest.approx(ln3, abs=1e-10)
    ends = {
        "audio": (0.8402100210, 0.9193614002),
        "visual": (0.9347260543, 1.1025441063),
        "fused": (0.7437734786, 0.8925432192),
    }
    for k, h in enumerate(HEADS):
        assert cb.measured[2 + 2 * k][h] == pytest.approx(ends[h][0], abs=1e-9)
        assert cb.measured[3 + 2 * k][h] == pytest.approx(ends[h][1], abs=1e-9)
    assert list(cb._last["generalization"].values()) == pytest.approx(
        [0.1792508884, -0.0039318176, 0.2060690695], abs=1e-9
    )
    assert list(cb._last["overfitting"].values()) == pytest.approx([0.0791513793, 0.1678180520, 0.1487697406], abs=1e-9)
    assert list(cb.weights.values()) == pytest.approx([0.75447974, 0, 0.24552026], abs=1e-8)
    train_end = {h: cb.measured[2 + 2 * k][h] for k, h in enumerate(HEADS)}
    val_end = {h: cb.measured[3 + 2 * k][h] for k, h in enumerate(HEADS)}
    exact = gblend_weights(train_start, val_start, train_end, val_end, eps=0)
    assert list(exact.values()) == pytest.approx([0.75447995, 0, 0.24552005], abs=1e-8)
    absolute = gblend_weights(train_start, val_start, train_end, val_end, policy="abs", eps=0)
    assert list(absolute.values()) == pytest.approx([0.75171256, 0.00366795, 0.24461949], abs=1e-8)


def test_g4_abs_policy_through_the_callback():
    cb = GradientBlending(mode="offline", estimation_epochs=5, policy="abs")
    g4_trainer(cb, max_steps=1).fit(G4Model(), datamodule=G4Data())
    assert list(cb.weights.values()) == pytest.approx([0.75171256, 0.00366795, 0.24461949], abs=1e-6)


def test_weights_reach_the_loss_g5():
    """grad(sum_h w_h CE_h) == sum_h w_h grad CE_h on every parameter."""
    checked = []

    class Spy(GradientBlending):
        def on_before_backward(self, trainer, pl_module, loss):
            rec = self._record
            params = list(pl_module.parameters())
            grad = lambda t: torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)  # noqa: E731
            total = grad(rec.loss)
            parts = {h: grad(rec.fused_loss if h == "fused" else rec.unimodal_losses[h]) for h in HEADS}
            w = self.weights
            assert rec.weights == {"fused": w["fused"], "audio": w["audio"], "visual": w["visual"]}
            for i in range(len(params)):
                expected = sum(w[h] * parts[h][i] for h in HEADS if parts[h][i] is not None)
                got = total[i] if total[i] is not None else torch.zeros_like(params[i])  # weight 0: not in the graph
                torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
            checked.append(True)
            super().on_before_backward(trainer, pl_module, loss)

    g4_trainer(Spy(mode="offline", estimation_epochs=5), max_steps=1).fit(G4Model(), datamodule=G4Data())
    assert checked == [True]


# ---------------------------------------------------------------------------------------------- isolation (G5)
class ShuffledData(TinyData):
    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)


class Snapshot(Callback):
    """Model, optimizer and RNG state at each epoch's first batch (where an estimation round runs), and the batches."""

    def __init__(self):
        self.states = []
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch[1].clone())
        if batch_idx != 0:
            return
        self.states.append(
            {
                "model": {k: v.clone() for k, v in pl_module.state_dict().items()},
                "optimizer": repr(trainer.optimizers[0].state_dict()),
                "rng": torch.get_rng_state().clone(),
            }
        )


@pytest.mark.parametrize("estimator", ["copies", "joint"])
def test_estimation_leaves_model_optimizer_and_order_untouched(estimator):
    before, after = Snapshot(), Snapshot()
    cb = GradientBlending(super_epoch=1, estimation_epochs=1, estimator=estimator)
    model = TinyModel(momentum=0.9)
    pl.seed_everything(3)
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[before, cb, after], max_epochs=3, limit_val_batches=1.0))
    trainer.fit(model, datamodule=ShuffledData())
    for b, a in zip(before.states, after.states, strict=True):
        assert b["optimizer"] == a["optimizer"]
        assert torch.equal(b["rng"], a["rng"])
        for k in b["model"]:
            assert torch.equal(b["model"][k], a["model"][k]), k
    plain = Snapshot()
    plain_model = TinyModel(momentum=0.9)  # TinyModel seeds torch: build it before seeding, as above
    pl.seed_everything(3)
    pl.Trainer(**trainer_kwargs(callbacks=[plain], max_epochs=1, limit_val_batches=1.0)).fit(
        plain_model, datamodule=ShuffledData()
    )
    n = len(plain.batches)
    for x, y in zip(plain.batches, after.batches[:n], strict=True):
        assert torch.equal(x, y)  # the first epoch's batch order is the one without the callback


def test_joint_estimator_schedule():
    cb = GradientBlending(super_epoch=2, estimator="joint")
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[cb], max_epochs=5, limit_val_batches=1.0))
    trainer.fit(TinyModel(), datamodule=TinyData())
    assert cb._last_round_epoch == 4
    assert cb._weights is not None and sum(cb.weights.values()) == pytest.approx(1.0)
    assert "mmbalance/gradient_blending/weight/fused" in trainer.callback_metrics
    assert "mmbalance/gradient_blending/ogr/a" in trainer.callback_metrics


def test_online_rounds_and_max_batches():
    cb = Probe(super_epoch=2, estimation_epochs=1, max_batches=2)
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[cb], max_epochs=3, limit_val_batches=1.0))
    trainer.fit(TinyModel(), datamodule=TinyData())
    assert cb._last_round_epoch == 2
    assert len(cb.measured) == 2 * (2 + 2 * 3)  # two rounds: 2 start passes + 2 per head


def test_resume_gives_the_same_weights(tmp_path):
    def run(epochs, ckpt_path=None, callbacks=()):
        cb = GradientBlending(super_epoch=2, estimation_epochs=1)
        kw = trainer_kwargs(
            callbacks=[cb, *callbacks],
            max_epochs=epochs,
            limit_val_batches=1.0,
            enable_checkpointing=bool(callbacks) or ckpt_path is not None,
            default_root_dir=tmp_path,
        )
        model = TinyModel(seed=7 if ckpt_path else 0)
        pl.Trainer(**kw).fit(model, datamodule=TinyData(), ckpt_path=ckpt_path)
        return cb, model

    full_cb, full = run(5)
    run(3, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    resumed_cb, resumed = run(5, ckpt_path=tmp_path / "last.ckpt")
    assert resumed_cb.weights == full_cb.weights
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=1e-12, rtol=0)


def test_missing_validation_loader():
    cb = GradientBlending()
    with pytest.raises(
        MisconfigurationException, match=r"GradientBlending needs a held-out validation loader \(val_dataloader\)"
    ):
        pl.Trainer(**trainer_kwargs(callbacks=[cb])).fit(TinyModel(), datamodule=TinyData())
    with pytest.raises(MisconfigurationException, match="never pass the test set"):
        pl.Trainer(**trainer_kwargs(callbacks=[cb], limit_val_batches=1.0)).fit(
            TinyModel(), datamodule=TinyData(with_val=False)
        )


def test_weights_before_estimation_are_uniform_and_state_round_trip():
    cb = GradientBlending(encoders={"a": "x", "b": "y"})
    cb._encoders = {"a": nn.Linear(1, 1), "b": nn.Linear(1, 1)}
    assert cb.weights == {"a": 1 / 3, "b": 1 / 3, "fused": 1 / 3}
    other = GradientBlending()
    other.load_state_dict(cb.state_dict())
    assert other.state_dict() == cb.state_dict()


class SaveWeights(Callback):
    def __init__(self, folder, blend):
        self.folder, self.blend = folder, blend

    def on_train_end(self, trainer, pl_module):
        torch.save(self.blend.state_dict(), self.folder / f"blend{trainer.global_rank}.pt")


@pytest.mark.ddp
@pytest.mark.parametrize("estimator", ["copies", "joint"])
def test_ddp_weights_identical_on_both_ranks(tmp_path, estimator):

    cb = GradientBlending(super_epoch=1, estimation_epochs=1, estimator=estimator)
    callbacks = [cb, SaveWeights(tmp_path, cb), SaveParams(tmp_path)]
    kw = trainer_kwargs(callbacks=callbacks, max_epochs=3, limit_val_batches=1.0, strategy="ddp_fork", devices=2)
    pl.Trainer(**kw).fit(TinyModel(), datamodule=TinyData(n=60, batch_size=4))
    states = [torch.load(tmp_path / f"blend{r}.pt", weights_only=False) for r in (0, 1)]
    assert states[0] == states[1] and states[0]["weights"] is not None
    rank0, rank1 = load_ranks(tmp_path)
    assert_states_close(rank0, rank1, atol=0)


def test_version_1_state_loads():
    """Checkpoints of version 1 also held the previous weights and an offline flag; they load into version 2."""
    weights = {"a": 0.2, "b": 0.3, "fused": 0.5}
    v1 = {
        "version": 1,
        "weights": weights,
        "previous_weights": None,
        "last": None,
        "last_round_epoch": 0,
        "offline_done": True,
        "joint_last": None,
    }
    cb = GradientBlending(mode="offline")
    cb.load_state_dict(v1)
    assert cb._weights == weights and cb.state_dict()["version"] == 2
    assert not cb._round_due(3)  # the offline estimate happened
