import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from sklearn.cluster import KMeans
from sklearn.preprocessing import MinMaxScaler
from torch import nn
from torch.utils.data import DataLoader

from lightning_mmbalance import DiagnosingRelearning
from lightning_mmbalance.functional import clustering_purity, relearning_alpha
from lightning_mmbalance.functional.relearning import _relearning_interpolate_
from tests.helpers.tiny import SaveParams, TinyData, TinyModel, assert_states_close, load_ranks, trainer_kwargs

CENTRES = [(0, 0), (10, 0), (0, 10)]


def blobs(offsets, dtype=torch.float64):
    return torch.tensor([[cx + ox, cy + oy] for cx, cy in CENTRES for ox, oy in offsets], dtype=dtype)


# ---------------------------------------------------------------------------------------------- R1-R3
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_r1_purity_and_alpha(dtype):
    train = blobs([(0, 0), (0.1, 0), (0, 0.1)], dtype)
    val = blobs([(0, 0), (0.1, 0.1)], dtype)
    p_train = clustering_purity(train, torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 0]), 3)
    p_val = clustering_purity(val, torch.tensor([0, 0, 1, 2, 2, 2]), 3)
    assert p_train == pytest.approx(7 / 9, abs=1e-12) and p_val == pytest.approx(5 / 6, abs=1e-12)
    assert relearning_alpha(p_train, p_val, 3.0) == pytest.approx(0.16514041292, abs=1e-10)
    assert clustering_purity(train, torch.tensor([0, 0, 2, 2, 2, 2, 5, 5, 0]), 3) == pytest.approx(7 / 9, abs=1e-12)


def test_r2_interpolation():
    theta, theta0 = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([1.0, -2.0], dtype=torch.float64)
    _relearning_interpolate_([theta], [theta0], 0.165140)
    torch.testing.assert_close(theta, torch.tensor([0.582570, 0.087150], dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("gap", "alpha"), [(0.05, 0.149), (0.1, 0.291), (0.2, 0.537), (0.3, 0.716)])
def test_r3_strength_table(gap, alpha):
    assert relearning_alpha(0.5 + gap, 0.5, 3.0) == pytest.approx(alpha, abs=5e-4)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: clustering_purity(torch.zeros(5, 2), torch.zeros(4), 2), r"must be \(N, D\)"),
        (lambda: clustering_purity(torch.zeros(2, 2), torch.zeros(2), 3), "at least n_clusters = 3 samples, got 2"),
        (lambda: clustering_purity(torch.zeros(4, 2), torch.zeros(4), 1), "`n_clusters` must be an int >= 2, got 1"),
        (lambda: relearning_alpha(1.2, 0.5, 3), r"`train_purity` must be in \[0, 1\], got 1.2"),
        (lambda: relearning_alpha(0.5, 0.5, -1), "`strength` must be a finite float >= 0, got -1"),
    ],
)
def test_functional_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------- R5
def official_reinit_score(features: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    """An independent re-statement of the official purity: scaler and k-means per matrix, majority label per cluster."""
    scaled = MinMaxScaler(feature_range=(-1, 1)).fit_transform(features)
    clusters = KMeans(n_clusters=n_classes, random_state=0, n_init=10).fit_predict(scaled)
    _, remapped = np.unique(labels, return_inverse=True)
    correct = 0
    for c in np.unique(clusters):
        correct += np.bincount(remapped[clusters == c]).max()
    return correct / len(labels)


def test_r5_same_purity_as_official_on_random_features():
    g = torch.Generator().manual_seed(0)
    for n, d in [(60, 5), (90, 8)]:
        x = torch.randn(n, d, generator=g)
        y = torch.randint(0, 3, (n,), generator=g)
        assert clustering_purity(x, y, 3, seed=0) == official_reinit_score(x.numpy(), y.numpy(), 3)


class BNModel(TinyModel):
    def __init__(self, **kw):
        super().__init__(momentum=0.9, **kw)
        self.encoders = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(d, 5), nn.BatchNorm1d(5), nn.Tanh()) for m, d in (("a", 4), ("b", 6))}
        ).double()


class Before(Callback):
    """Runs before the D&R callback in the same hook: snapshots, and computes the expected alpha independently."""

    def __init__(self, epoch):
        self.epoch = epoch
        self.snapshot = None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch != self.epoch:
            return
        opt = trainer.optimizers[0]
        self.snapshot = {
            "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "buffers": {n: b.clone() for n, b in pl_module.named_buffers()},
            "momentum": {id(p): opt.state[p]["momentum_buffer"].clone() for p in pl_module.parameters()},
            "param_ids": [id(p) for p in pl_module.parameters()],
        }
        data = trainer.datamodule
        was = pl_module.training
        pl_module.eval()
        alphas = {}
        with torch.no_grad():
            outs = [pl_module(next(iter(DataLoader(ds, batch_size=len(ds))))) for ds in (data.train_set, data.val_set)]
        pl_module.train(was)
        for m in ("a", "b"):
            purities = [official_reinit_score(o.features[m].numpy(), o.targets.numpy(), 3) for o in outs]
            alphas[m] = math.tanh(3.0 * abs(purities[0] - purities[1]))
        self.snapshot["alpha"] = alphas


def test_r5_end_to_end_with_batchnorm_encoders():
    before = Before(epoch=3)
    cb = DiagnosingRelearning(every_n_epochs=2, max_reinits=1)
    model = BNModel()
    theta0 = {n: p.detach().clone() for n, p in model.encoders.named_parameters()}
    kw = trainer_kwargs(callbacks=[before, cb], max_epochs=4, limit_val_batches=1.0)
    snapshots = {}

    class After(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 3:
                snapshots["params"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
                snapshots["buffers"] = {n: b.clone() for n, b in pl_module.named_buffers()}
                opt = trainer.optimizers[0]
                snapshots["momentum"] = {id(p): opt.state[p]["momentum_buffer"].clone() for p in pl_module.parameters()}

    kw["callbacks"].append(After())
    trainer = pl.Trainer(**kw)
    trainer.fit(model, datamodule=TinyData())
    snap = before.snapshot
    for m in ("a", "b"):
        assert cb._last[m]["alpha"] == pytest.approx(snap["alpha"][m], abs=1e-12)
    assert max(v["alpha"] for v in cb._last.values()) > 0  # the test exercises a real re-init
    for name, p in snapshots["params"].items():
        if name.startswith("encoders."):
            m, rest = name.split(".", 2)[1:]
            alpha = snap["alpha"][m]
            torch.testing.assert_close(
                p, alpha * theta0[f"{m}.{rest}"] + (1 - alpha) * snap["params"][name], atol=1e-6, rtol=0
            )
        else:
            assert torch.equal(p, snap["params"][name]), name  # the head is untouched
    for name, b in snapshots["buffers"].items():
        assert torch.equal(b, snap["buffers"][name]), name  # BN running statistics untouched
    assert [id(p) for p in model.parameters()] == snap["param_ids"]
    for key, buf in snapshots["momentum"].items():
        assert torch.equal(buf, snap["momentum"][key])  # optimizer state untouched, keyed by the same Parameters
    assert float(trainer.callback_metrics["mmbalance/relearning/alpha/a"]) == pytest.approx(
        snap["alpha"]["a"], rel=1e-6
    )
    assert "mmbalance/relearning/train_purity/b" in trainer.callback_metrics


def test_reset_optimizer_state():
    cb = DiagnosingRelearning(every_n_epochs=1, max_reinits=1, reset_optimizer_state=True)
    states = {}

    class After(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                opt = trainer.optimizers[0]
                states["encoder"] = [p in opt.state for p in pl_module.encoders.parameters()]
                states["head"] = [p in opt.state for p in pl_module.head.parameters()]

    kw = trainer_kwargs(callbacks=[cb, After()], max_epochs=3, limit_val_batches=1.0)
    pl.Trainer(**kw).fit(TinyModel(momentum=0.9), datamodule=TinyData())
    assert states == {"encoder": [False] * 8, "head": [True, True]}


# ---------------------------------------------------------------------------------------------- R4 schedule
class ScheduleProbe(DiagnosingRelearning):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.runs = []

    def _diagnose(self, trainer, pl_module):
        self.runs.append((trainer.current_epoch - 1, trainer.current_epoch))
        return {m: (0.9, 0.8) for m in self.modalities}


@pytest.mark.parametrize(("max_epochs", "expected"), [(90, [(20, 21), (40, 41), (60, 61)]), (21, [])])
def test_r4_schedule(max_epochs, expected):
    cb = ScheduleProbe(every_n_epochs=20, max_reinits=3)
    kw = trainer_kwargs(callbacks=[cb], max_epochs=max_epochs, limit_train_batches=1, limit_val_batches=1)
    pl.Trainer(**kw).fit(TinyModel(), datamodule=TinyData())
    assert cb.runs == expected


# ---------------------------------------------------------------------------------------------- R6 invariants
@pytest.mark.ddp
def test_ddp_identical_and_equal_to_one_process(tmp_path):
    class SaveAlpha(Callback):
        def __init__(self, cb):
            self.cb = cb

        def on_train_end(self, trainer, pl_module):
            torch.save(self.cb._last, tmp_path / f"alpha{trainer.global_rank}.pt")

    cb = DiagnosingRelearning(every_n_epochs=1, max_reinits=2, strength=10.0)
    kw = trainer_kwargs(
        callbacks=[cb, SaveAlpha(cb), SaveParams(tmp_path)],
        max_epochs=4,
        limit_val_batches=1.0,
        strategy="ddp_fork",
        devices=2,
    )
    pl.Trainer(**kw).fit(TinyModel(), datamodule=TinyData(n=62, batch_size=4))
    alphas = [torch.load(tmp_path / f"alpha{r}.pt") for r in (0, 1)]
    assert alphas[0] == alphas[1] and alphas[0]
    rank0, rank1 = load_ranks(tmp_path)
    assert_states_close(rank0, rank1, atol=0)
    single = DiagnosingRelearning(every_n_epochs=1, max_reinits=2, strength=10.0)
    kw = trainer_kwargs(callbacks=[single], max_epochs=4, limit_val_batches=1.0)
    pl.Trainer(**kw).fit(TinyModel(), datamodule=TinyData(n=62, batch_size=8))
    for m in ("a", "b"):
        for q in ("train_purity", "val_purity"):
            assert alphas[0][m][q] == pytest.approx(single._last[m][q], abs=1e-12)


@pytest.mark.ddp
def test_gather_restores_dataset_order(tmp_path):
    """Features gathered from 2 ranks (odd count, rank 1 shorter) come back in dataset order."""
    seen = {}

    class Probe(DiagnosingRelearning):
        def _features(self, trainer, pl_module, loader):
            out = super()._features(trainer, pl_module, loader)
            seen.setdefault(trainer.global_rank, []).append(out[1])
            if trainer.global_rank == 0:
                torch.save(seen[0], tmp_path / "labels.pt")
            return out

    cb = Probe(every_n_epochs=1, max_reinits=1)
    kw = trainer_kwargs(callbacks=[cb], max_epochs=3, limit_val_batches=1.0, strategy="ddp_fork", devices=2)
    data = TinyData(n=63, batch_size=4)
    pl.Trainer(**kw).fit(TinyModel(), datamodule=data)
    train_labels, val_labels = torch.load(tmp_path / "labels.pt")
    assert torch.equal(train_labels, data.train_set.targets) and torch.equal(val_labels, data.val_set.targets)


def test_resume_is_exact(tmp_path):
    def run(epochs, ckpt_path=None, extra=()):
        cb = DiagnosingRelearning(every_n_epochs=2, max_reinits=2, strength=10.0)
        kw = trainer_kwargs(
            callbacks=[cb, *extra],
            max_epochs=epochs,
            limit_val_batches=1.0,
            enable_checkpointing=True,
            default_root_dir=tmp_path,
        )
        model = TinyModel(seed=5 if ckpt_path else 0)
        pl.Trainer(**kw).fit(model, datamodule=TinyData(), ckpt_path=ckpt_path)
        return cb, model

    full_cb, full = run(6)
    run(3, extra=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])  # last.ckpt at the end of epoch 2
    resumed_cb, resumed = run(6, ckpt_path=tmp_path / "last.ckpt")
    assert resumed_cb._last == full_cb._last and resumed_cb._n_reinits == full_cb._n_reinits == 2
    assert_states_close(resumed.state_dict(), full.state_dict(), atol=0)


def test_max_samples_subset_and_order_untouched():
    class Shuffled(TinyData):
        def train_dataloader(self):
            return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    class Batches(Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append(batch[1].clone())

    def run(callbacks):
        rec = Batches()
        model = TinyModel()
        pl.seed_everything(1)
        kw = trainer_kwargs(callbacks=[*callbacks, rec], max_epochs=3, limit_val_batches=1.0)
        pl.Trainer(**kw).fit(model, datamodule=Shuffled())
        return rec.seen

    cb = DiagnosingRelearning(every_n_epochs=1, max_reinits=1, max_samples=20)
    with_cb, without = run([cb]), run([])
    assert all(torch.equal(a, b) for a, b in zip(with_cb, without, strict=True))
    big, small = [0] * 64, [0] * 10
    assert cb._subset(big) == sorted(cb._subset(big)) and len(cb._subset(big)) == 20 and cb._subset(small) is None


def test_missing_validation_loader_and_features():
    cb = DiagnosingRelearning()
    with pytest.raises(MisconfigurationException, match="DiagnosingRelearning needs a held-out validation loader"):
        pl.Trainer(**trainer_kwargs(callbacks=[cb])).fit(TinyModel(), datamodule=TinyData())

    class NoFeatures(TinyModel):
        def forward(self, batch):
            out = super().forward(batch)
            out.features = {}
            return out

    with pytest.raises(ValueError, match=r"DiagnosingRelearning needs the encoder features.*lacks \['a', 'b'\]"):
        pl.Trainer(**trainer_kwargs(callbacks=[DiagnosingRelearning()], limit_val_batches=1.0)).fit(
            NoFeatures(), datamodule=TinyData()
        )


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, pairs):
        self.pairs = pairs

    def __iter__(self):
        return iter(self.pairs[i] for i in range(len(self.pairs)))


def test_max_samples_needs_map_style_data():
    class Data(TinyData):
        def train_dataloader(self):
            return DataLoader(_Stream(self.train_set), batch_size=self.batch_size)

    cb = DiagnosingRelearning(every_n_epochs=1, max_samples=8)
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[cb], max_epochs=3, limit_val_batches=1.0))
    match = r"DiagnosingRelearning\(max_samples=8\) needs map-style datasets \(with `__len__`\), got _Stream"
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(TinyModel(), datamodule=Data())
