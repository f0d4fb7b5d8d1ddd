"""Built-in data modules: batch format, splits, the CG-Digits colour shortcut, determinism, argument errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from lightning_mmbalance.data import (
    CGDigitsDataModule,
    MultimodalDataModule,
    MultimodalTensorDataset,
    PartsDataModule,
    SyntheticDataModule,
)
from lightning_mmbalance.data.cg_digits import NUM_DIGITS, PALETTE


@pytest.fixture(scope="module")
def cg() -> CGDigitsDataModule:
    dm = CGDigitsDataModule(color_correlation=0.9, batch_size=32, seed=0)
    dm.setup("fit")
    return dm


def _splits(dm: MultimodalDataModule) -> dict[str, MultimodalTensorDataset]:
    return {"train": dm.train_set, "val": dm.val_set, "test": dm.test_set}


def _check_batch(batch: object, dm: MultimodalDataModule, batch_size: int) -> None:
    inputs, targets = batch
    assert isinstance(inputs, dict)
    assert tuple(inputs) == dm.modalities
    for m, x in inputs.items():
        assert x.dtype == torch.float32
        assert list(x.shape) == [batch_size, *dm.input_shapes[m]]
    assert targets.dtype == torch.int64
    assert targets.shape == (batch_size,)
    assert int(targets.min()) >= 0 and int(targets.max()) < dm.num_classes


# --- MultimodalTensorDataset -------------------------------------------------------------------------------------


def test_tensor_dataset_items() -> None:
    ds = MultimodalTensorDataset({"a": torch.arange(6.0).view(3, 2), "b": torch.ones(3, 4)}, torch.tensor([2, 1, 0]))
    assert len(ds) == 3
    x, y = ds[1]
    assert torch.equal(x["a"], torch.tensor([2.0, 3.0])) and x["b"].shape == (4,)
    assert int(y) == 1


def test_tensor_dataset_errors() -> None:
    with pytest.raises(ValueError, match=r"Modality 'b' has 2 samples but there are 3 targets"):
        MultimodalTensorDataset({"a": torch.zeros(3, 2), "b": torch.zeros(2, 2)}, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one modality"):
        MultimodalTensorDataset({}, torch.zeros(3, dtype=torch.long))


# --- CG-Digits ---------------------------------------------------------------------------------------------------


def test_cg_properties_before_setup() -> None:
    dm = CGDigitsDataModule()
    assert dm.train_set is None
    assert dm.modalities == ("gray", "color")
    assert dm.input_shapes == {"gray": [1, 8, 8], "color": [3, 8, 8]}
    assert dm.num_classes == 10
    assert dm.hparams["color_correlation"] == 0.9 and dm.hparams["seed"] == 0


def test_cg_batches(cg: CGDigitsDataModule) -> None:
    for loader in (cg.train_dataloader(), cg.val_dataloader(), cg.test_dataloader()):
        _check_batch(next(iter(loader)), cg, 32)
    gray, color = cg.train_set.inputs["gray"], cg.train_set.inputs["color"]
    assert float(gray.min()) >= 0 and float(gray.max()) <= 1
    # The colour view is the gray digit times the sample's palette colour.
    tint = torch.from_numpy(PALETTE[cg.colors["train"]])[:, :, None, None]
    assert torch.equal(color, gray * tint)


def test_cg_setup_is_idempotent(cg: CGDigitsDataModule) -> None:
    train = cg.train_set
    cg.setup("test")
    assert cg.train_set is train


def test_cg_splits_disjoint_and_cover(cg: CGDigitsDataModule) -> None:
    idx = cg.split_indices
    assert {k: len(v) for k, v in idx.items()} == {k: len(ds) for k, ds in _splits(cg).items()}
    assert len(idx["test"]) == round(0.25 * NUM_DIGITS) and len(idx["val"]) == round(0.15 * NUM_DIGITS)
    assert not set(idx["train"]) & set(idx["val"])
    assert not set(idx["train"]) & set(idx["test"])
    assert not set(idx["val"]) & set(idx["test"])
    assert np.array_equal(np.sort(np.concatenate(list(idx.values()))), np.arange(NUM_DIGITS))


def test_cg_split_indices_map_to_images(cg: CGDigitsDataModule) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for name, ds in _splits(cg).items():
        idx = cg.split_indices[name]
        assert np.array_equal(ds.targets.numpy(), digits.target[idx])
        assert np.allclose(ds.inputs["gray"][:, 0].numpy(), digits.images[idx] / 16.0)


def test_cg_stratified(cg: CGDigitsDataModule) -> None:
    overall = np.bincount(np.concatenate([ds.targets.numpy() for ds in _splits(cg).values()]), minlength=10)
    overall = overall / overall.sum()
    for ds in _splits(cg).values():
        counts = np.bincount(ds.targets.numpy(), minlength=10)
        assert np.abs(counts / counts.sum() - overall).max() < 0.01


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9, 1.0])
def test_cg_colour_shortcut(rho: float) -> None:
    dm = CGDigitsDataModule(color_correlation=rho, seed=3)
    dm.setup()
    for name, ds in _splits(dm).items():
        same = float((dm.colors[name] == ds.targets.numpy()).mean())
        # Train: class colour with prob rho, else uniform (which hits the class colour 1/10 of the time).
        expected = rho + (1 - rho) / 10 if name == "train" else 0.1
        assert same == pytest.approx(expected, abs=0.04), name
    assert np.array_equal(dm.colors["train"], dm.train_set.targets.numpy()) == (rho == 1.0)


def test_cg_palette_separated() -> None:
    unit = PALETTE / np.linalg.norm(PALETTE, axis=1, keepdims=True)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -1)
    assert PALETTE.shape == (10, 3)
    assert np.degrees(np.arccos(cos.max())) > 20


def test_cg_determinism(cg: CGDigitsDataModule) -> None:
    same = CGDigitsDataModule(color_correlation=0.9, seed=0)
    same.setup()
    other = CGDigitsDataModule(color_correlation=0.9, seed=1)
    other.setup()
    for name, ds in _splits(cg).items():
        twin = _splits(same)[name]
        assert torch.equal(ds.targets, twin.targets)
        assert all(torch.equal(ds.inputs[m], twin.inputs[m]) for m in cg.modalities)
        assert not np.array_equal(cg.split_indices[name], other.split_indices[name])
        assert not np.array_equal(cg.colors[name], other.colors[name])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"color_correlation": -0.1}, ValueError, r"`color_correlation` must be a finite float in \[0, 1\], got -0.1"),
        ({"color_correlation": 1.5}, ValueError, r"`color_correlation` must be a finite float in \[0, 1\], got 1.5"),
        ({"val_fraction": 0.0}, ValueError, r"`val_fraction` must be a finite float in \(0, 1\), got 0.0"),
        ({"test_fraction": 1.0}, ValueError, r"`test_fraction` must be a finite float in \(0, 1\), got 1.0"),
        (
            {"val_fraction": 0.5, "test_fraction": 0.5},
            ValueError,
            r"`val_fraction \+ test_fraction` must be < 1, got 0.5 \+ 0.5",
        ),
        ({"val_fraction": 0.001}, ValueError, r"Every split needs at least 10 of the 1797 samples"),
        ({"val_fraction": 0.5, "test_fraction": 0.499}, ValueError, r"Every split needs at least 10.*'train': 2"),
        ({"batch_size": 0}, ValueError, r"`batch_size` must be an int >= 1, got 0"),
        ({"batch_size": 8.0}, TypeError, r"`batch_size` must be an int >= 1, got 8.0"),
        ({"num_workers": -1}, ValueError, r"`num_workers` must be an int >= 0, got -1"),
        ({"seed": -3}, ValueError, r"`seed` must be an int >= 0, got -3"),
        ({"seed": True}, TypeError, r"`seed` must be an int >= 0, got True"),
    ],
)
def test_cg_errors(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        CGDigitsDataModule(**kwargs)


# --- Synthetic ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def syn() -> SyntheticDataModule:
    dm = SyntheticDataModule(batch_size=16, seed=0)
    dm.setup()
    return dm


def test_synthetic_properties_before_setup() -> None:
    dm = SyntheticDataModule(num_modalities=3, dim=5, num_classes=6)
    assert dm.modalities == ("m0", "m1", "m2")
    assert dm.input_shapes == {"m0": [5], "m1": [5], "m2": [5]}
    assert dm.num_classes == 6
    assert dm.signal == [3.0, 2.0, 1.0]
    assert SyntheticDataModule().signal == [3.0, 1.0]
    assert SyntheticDataModule(signal=[0.5, 2.0]).signal == [0.5, 2.0]


def test_synthetic_batches_and_sizes(syn: SyntheticDataModule) -> None:
    assert [len(ds) for ds in _splits(syn).values()] == [1024, 256, 512]
    for loader in (syn.train_dataloader(), syn.val_dataloader(), syn.test_dataloader()):
        _check_batch(next(iter(loader)), syn, 16)
    for ds in _splits(syn).values():
        counts = torch.bincount(ds.targets, minlength=syn.num_classes)
        assert int(counts.max() - counts.min()) <= 1


def test_synthetic_generative_model() -> None:
    # Without noise every sample is exactly signal * (a unit-norm class mean).
    dm = SyntheticDataModule(signal=[3.0, 1.0], noise=1e-12, n_train=64)
    dm.setup()
    for m, s in zip(dm.modalities, dm.signal, strict=True):
        x = dm.train_set.inputs[m]
        assert torch.allclose(x.norm(dim=1), torch.full((64,), s), atol=1e-5)
        # The same class always gives the same vector; different classes give different vectors.
        means = torch.stack([x[dm.train_set.targets == c][0] for c in range(dm.num_classes)])
        assert torch.allclose(x, means[dm.train_set.targets], atol=1e-5)
        assert torch.cdist(means, means).add(torch.eye(dm.num_classes)).min() > 0.1


def test_synthetic_strong_modality_more_separable(syn: SyntheticDataModule) -> None:
    acc = {}
    for m in syn.modalities:
        clf = LogisticRegression(max_iter=500).fit(syn.train_set.inputs[m].numpy(), syn.train_set.targets.numpy())
        acc[m] = clf.score(syn.val_set.inputs[m].numpy(), syn.val_set.targets.numpy())
    assert acc["m0"] > 0.9
    assert acc["m0"] > acc["m1"] + 0.2


def test_synthetic_determinism(syn: SyntheticDataModule) -> None:
    same, other = SyntheticDataModule(seed=0), SyntheticDataModule(seed=1)
    same.setup()
    other.setup()
    for name, ds in _splits(syn).items():
        assert torch.equal(ds.targets, _splits(same)[name].targets)
        for m in syn.modalities:
            assert torch.equal(ds.inputs[m], _splits(same)[name].inputs[m])
            assert not torch.equal(ds.inputs[m], _splits(other)[name].inputs[m])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_modalities": 1}, ValueError, r"`num_modalities` must be an int >= 2, got 1"),
        (
            {"signal": [3.0, 2.0, 1.0]},
            ValueError,
            r"`signal` must list 2 non-negative strengths.*got \[3.0, 2.0, 1.0\]",
        ),
        ({"num_modalities": 3, "signal": [3.0, 1.0]}, ValueError, r"`signal` must list 3 non-negative strengths"),
        ({"signal": [3.0, -1.0]}, ValueError, r"`signal` must list 2 non-negative strengths.*got \[3.0, -1.0\]"),
        ({"dim": 0}, ValueError, r"`dim` must be an int >= 1, got 0"),
        ({"num_classes": 1}, ValueError, r"`num_classes` must be an int >= 2, got 1"),
        ({"n_train": 0}, ValueError, r"`n_train` must be an int >= 1, got 0"),
        ({"n_val": 0}, ValueError, r"`n_val` must be an int >= 1, got 0"),
        ({"n_test": -5}, ValueError, r"`n_test` must be an int >= 1, got -5"),
        ({"noise": 0.0}, ValueError, r"`noise` must be a finite float > 0, got 0.0"),
        ({"batch_size": -1}, ValueError, r"`batch_size` must be an int >= 1, got -1"),
        ({"num_workers": 1.5}, TypeError, r"`num_workers` must be an int >= 0, got 1.5"),
        ({"seed": -1}, ValueError, r"`seed` must be an int >= 0, got -1"),
    ],
)
def test_synthetic_errors(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        SyntheticDataModule(**kwargs)


# --- DataLoaders -------------------------------------------------------------------------------------------------


def _order(loader: torch.utils.data.DataLoader) -> torch.Tensor:
    return torch.cat([x["m0"][:, 0] for x, _ in loader])


def test_train_loader_shuffles_reproducibly() -> None:
    dm = SyntheticDataModule(n_train=64, n_val=32, n_test=32, batch_size=8, seed=0)
    twin = SyntheticDataModule(n_train=64, n_val=32, n_test=32, batch_size=8, seed=0)
    loader, twin_loader = dm.train_dataloader(), twin.train_dataloader()
    first, second = _order(loader), _order(loader)
    # Shuffled: not the dataset order; a new permutation each epoch; the same sequence for the same seed.
    assert not torch.equal(first, dm.train_set.inputs["m0"][:, 0])
    assert torch.equal(torch.sort(first).values, torch.sort(dm.train_set.inputs["m0"][:, 0]).values)
    assert not torch.equal(first, second)
    assert torch.equal(first, _order(twin_loader)) and torch.equal(second, _order(twin_loader))
    # Validation and test keep the dataset order.
    assert torch.equal(_order(dm.val_dataloader()), dm.val_set.inputs["m0"][:, 0])
    assert torch.equal(_order(dm.test_dataloader()), dm.test_set.inputs["m0"][:, 0])


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_loaders_in_a_trainer() -> None:
    import lightning.pytorch as pl

    seen: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []

    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(1, 1)

        def training_step(self, batch: tuple[dict[str, torch.Tensor], torch.Tensor], batch_idx: int) -> torch.Tensor:
            seen.append(batch)
            return self.w(batch[0]["gray"].mean(dim=(1, 2, 3))[:, None]).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = CGDigitsDataModule(batch_size=50)
    trainer = pl.Trainer(
        max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(Probe(), datamodule=dm)
    assert len(seen) == 2
    _check_batch(seen[0], dm, 50)


# --- Parts ------------------------------------------------------------------------------------------------------------


def test_parts_construction() -> None:
    """a is in A only (linearly), b in B only (the XOR of sign pairs), the splits balanced and deterministic."""
    dm = PartsDataModule(d_a=64, n_train=120, n_val=60, n_test=60)
    dm.setup()
    assert dm.input_shapes == {"A": [64], "B": [8]} and dm.num_classes == 12
    for name, ds in (("train", dm.train_set), ("val", dm.val_set), ("test", dm.test_set)):
        a, b = dm.parts[name]
        assert torch.equal(ds.targets, a * 4 + b)
        assert torch.bincount(ds.targets, minlength=12).tolist() == [len(ds) // 12] * 12
        x_b = ds.inputs["B"]
        for j in range(2):  # bit j of b is set exactly when the signs of coordinates 2j and 2j+1 differ
            differ = (torch.sign(x_b[:, 2 * j]) != torch.sign(x_b[:, 2 * j + 1])).long()
            assert torch.equal(differ, (b >> j) & 1)
    x_a, (a, _) = dm.train_set.inputs["A"], dm.parts["train"]
    centroids = torch.stack([x_a[a == k].mean(0) for k in range(3)])
    assert torch.equal(torch.cdist(dm.test_set.inputs["A"], centroids).argmin(1), dm.parts["test"][0])  # A: linear in a
    again = PartsDataModule(d_a=64, n_train=120, n_val=60, n_test=60)
    again.setup()
    assert torch.equal(again.train_set.inputs["A"], dm.train_set.inputs["A"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k_a": 1}, ValueError, r"`k_a` must be an int >= 2, got 1"),
        ({"n_bits": 0}, ValueError, r"`n_bits` must be an int >= 1, got 0"),
        ({"d_b": 3}, ValueError, r"`d_b` must be an int >= 4, got 3"),
        ({"s_b": 0.0}, ValueError, r"`s_b` must be a finite float > 0, got 0.0"),
        ({"sigma_a": "x"}, TypeError, r"`sigma_a` must be a finite float > 0, got 'x'"),
        ({"n_val": 0}, ValueError, r"`n_val` must be an int >= 1, got 0"),
    ],
)
def test_parts_errors(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        PartsDataModule(**kwargs)
