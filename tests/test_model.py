import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_mmbalance import OGMGE, MMPareto, MultimodalOutput
from lightning_mmbalance.contract import resolve_encoders, validate_output
from lightning_mmbalance.fusion import ConcatFusion, SumFusion
from lightning_mmbalance.models import LateFusionClassifier

SHAPES = {"a": [4], "v": [1, 6, 6]}
CLASSES = 3


def samples(n: int = 96, seed: int = 0) -> list[tuple[dict[str, Tensor], Tensor]]:
    """Easy data: "a" is a noisy class mean, "v" an image whose brightness depends on the class."""
    means = 3 * torch.randn(CLASSES, 4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    xa = means[y] + torch.randn(n, 4, generator=g)
    xv = (y.float() - 1).view(n, 1, 1, 1) + 0.5 * torch.randn(n, 1, 6, 6, generator=g)
    return [({"a": xa[i], "v": xv[i]}, y[i]) for i in range(n)]


def batch(shapes: dict[str, list[int]], size: int = 5) -> tuple[dict[str, Tensor], Tensor]:
    torch.manual_seed(1)
    return {m: torch.randn(size, *s) for m, s in shapes.items()}, torch.arange(size) % CLASSES


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_forward_vector_and_image_modalities() -> None:
    torch.manual_seed(0)
    model = LateFusionClassifier(SHAPES, CLASSES, feature_dim=8, hidden_dim=16)
    inputs, y = batch(SHAPES)
    out = model((inputs, y))
    assert isinstance(out, MultimodalOutput)
    assert out.logits.shape == (5, CLASSES)
    assert list(out.unimodal_logits) == ["a", "v"]
    assert all(z.shape == (5, CLASSES) for z in out.unimodal_logits.values())
    assert {m: f.shape for m, f in out.features.items()} == {"a": (5, 8), "v": (5, 8)}
    assert out.targets is y
    assert isinstance(model.encoders["v"][0], nn.Conv2d) and isinstance(model.encoders["a"][0], nn.Linear)
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in model.modules())
    assert isinstance(model.fusion, ConcatFusion) and model.unimodal_heads is None
    # the default split bias: the unimodal logits sum to the fused ones
    torch.testing.assert_close(sum(out.unimodal_logits.values()), out.logits, atol=1e-6, rtol=0)
    validate_output(out, tuple(resolve_encoders(model)))


def test_three_modalities_sum_fusion() -> None:
    shapes = {"a": [4], "b": [7], "v": [3, 5, 5]}
    model = LateFusionClassifier(shapes, CLASSES, feature_dim=8, hidden_dim=16, fusion="sum")
    assert isinstance(model.fusion, SumFusion)
    out = model(batch(shapes))
    assert list(out.unimodal_logits) == ["a", "b", "v"] == list(model.modalities)
    torch.testing.assert_close(sum(out.unimodal_logits.values()), out.logits, atol=1e-6, rtol=0)
    for m, f in out.features.items():
        torch.testing.assert_close(out.unimodal_logits[m], model.fusion.fcs[m](f), atol=0, rtol=0)


def test_whole_bias() -> None:
    model = LateFusionClassifier(SHAPES, CLASSES, feature_dim=8, bias="whole")
    out = model(batch(SHAPES))
    fc = model.fusion.fc
    expected = out.features["a"] @ fc.weight[:, :8].T + fc.bias
    torch.testing.assert_close(out.unimodal_logits["a"], expected, atol=1e-6, rtol=0)


def test_unimodal_heads() -> None:
    model = LateFusionClassifier(SHAPES, CLASSES, feature_dim=8, unimodal_heads=True)
    assert set(model.unimodal_heads) == {"a", "v"}
    out = model(batch(SHAPES))
    for m, f in out.features.items():
        torch.testing.assert_close(out.unimodal_logits[m], model.unimodal_heads[m](f), atol=0, rtol=0)
    torch.testing.assert_close(out.logits, model.fusion(out.features).logits, atol=0, rtol=0)
    (grad,) = torch.autograd.grad(out.unimodal_logits["a"].sum(), model.encoders["a"][0].weight)
    assert grad.abs().sum() > 0


def test_masked_forward_zeroes_features() -> None:
    model = LateFusionClassifier(SHAPES, CLASSES, feature_dim=8)
    data = batch(SHAPES)
    out, masked = model(data), model.masked_forward(data, frozenset({"v"}))
    assert torch.equal(masked.features["v"], torch.zeros(5, 8))
    torch.testing.assert_close(masked.features["a"], out.features["a"], atol=0, rtol=0)
    torch.testing.assert_close(masked.logits, model.fusion({**out.features, "v": torch.zeros(5, 8)}).logits)
    with pytest.raises(ValueError, match=r"Cannot mask unknown modalities \['x'\]; the model has \['a', 'v'\]"):
        model.masked_forward(data, frozenset({"x"}))
    with pytest.raises(ValueError, match=r"The batch lacks the modalities \['v'\]: the inputs have \['a'\]"):
        model(({"a": data[0]["a"]}, data[1]))


def full_loss(model: LateFusionClassifier, data: list) -> tuple[float, float]:
    (inputs, y) = next(iter(DataLoader(data, batch_size=len(data))))
    with torch.no_grad():
        logits = model((inputs, y)).logits
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def test_model_learns_and_logs_documented_metrics() -> None:
    pl.seed_everything(0, verbose=False)
    data = samples()
    model = LateFusionClassifier(SHAPES, CLASSES, feature_dim=16, hidden_dim=32, lr=0.05)
    loss_before, _ = full_loss(model, data)
    fit = trainer(max_epochs=8)
    fit.fit(model, DataLoader(data, batch_size=16, shuffle=True), DataLoader(samples(48, seed=1), batch_size=16))
    loss_after, acc_after = full_loss(model, data)
    assert loss_after < 0.3 * loss_before
    assert acc_after > 0.9
    logged = set(fit.callback_metrics)
    assert {"train/loss", "train/acc", "train/acc_a", "train/acc_v", "val/loss", "val/acc", "val/acc_a"} <= logged
    assert fit.callback_metrics["val/acc"] > 0.9
    fit.test(model, DataLoader(samples(48, seed=2), batch_size=16), verbose=False)
    assert set(fit.callback_metrics) == {"test/loss", "test/acc", "test/acc_a", "test/acc_v"}


@pytest.mark.parametrize(
    ("callback", "kwargs"), [(OGMGE, {}), (MMPareto, {"unimodal_heads": True}), (MMPareto, {"fusion": "sum"})]
)
def test_trains_with_a_balancing_callback(callback, kwargs) -> None:
    pl.seed_everything(0, verbose=False)
    model = LateFusionClassifier(SHAPES, CLASSES, feature_dim=8, hidden_dim=16, **kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = trainer(max_epochs=1, limit_train_batches=2, callbacks=[callback()])
    fit.fit(model, DataLoader(samples(32), batch_size=8))
    assert torch.isfinite(fit.callback_metrics["train/loss"])
    assert not torch.equal(before["encoders.a.0.weight"], model.state_dict()["encoders.a.0.weight"])


@pytest.mark.parametrize(
    ("name", "cls"), [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
def test_configure_optimizers(name: str, cls: type) -> None:
    model = LateFusionClassifier(SHAPES, CLASSES, optimizer=name, lr=0.2, momentum=0.5, weight_decay=0.01)
    optimizer = model.configure_optimizers()
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.2 and group["weight_decay"] == 0.01
    assert len(group["params"]) == len(list(model.parameters()))
    if name == "sgd":
        assert group["momentum"] == 0.5


def test_hyperparameters_saved() -> None:
    model = LateFusionClassifier(SHAPES, CLASSES, fusion="sum", optimizer="adam")
    assert model.hparams["input_shapes"] == SHAPES
    assert model.hparams["fusion"] == "sum" and model.hparams["optimizer"] == "adam"
    assert model.hparams["lr"] == 0.01 and model.hparams["momentum"] == 0.9


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"input_shapes": {}},
            ValueError,
            "`input_shapes` must be a non-empty mapping modality -> input shape, got {}",
        ),
        ({"input_shapes": {"a": [4], "s": [2, 3]}}, ValueError, r"modality 's' must be \[D\] .* got \[2, 3\]"),
        ({"input_shapes": {"a": [0]}}, ValueError, r"modality 'a' must be \[D\] .* got \[0\]"),
        ({"input_shapes": {"a": 4}}, ValueError, r"modality 'a' must be \[D\] .* got 4"),
        ({"num_classes": 1}, ValueError, "`num_classes` must be an int >= 2, got 1"),
        ({"feature_dim": 0}, ValueError, "`feature_dim` must be an int >= 1, got 0"),
        ({"hidden_dim": 2.0}, TypeError, "`hidden_dim` must be an int >= 1, got 2.0"),
        ({"fusion": "film"}, ValueError, r"`fusion` must be one of \('concat', 'sum'\), got 'film'"),
        ({"bias": "none"}, ValueError, r"`bias` must be one of \('split', 'whole'\), got 'none'"),
        ({"optimizer": "lbfgs"}, ValueError, r"`optimizer` must be one of \('sgd', 'adam', 'adamw'\), got 'lbfgs'"),
        ({"lr": 0.0}, ValueError, "`lr` must be a finite float > 0, got 0.0"),
        ({"momentum": 1.0}, ValueError, r"`momentum` must be a finite float in \[0, 1\), got 1.0"),
        ({"momentum": -0.1}, ValueError, r"`momentum` must be a finite float in \[0, 1\), got -0.1"),
        ({"weight_decay": float("nan")}, ValueError, "`weight_decay` must be a finite float >= 0, got nan"),
    ],
)
def test_argument_errors(kwargs: dict, error: type[Exception], match: str) -> None:
    args = {"input_shapes": SHAPES, "num_classes": CLASSES, **kwargs}
    with pytest.raises(error, match=match):
        LateFusionClassifier(**args)


def test_unimodal_heads_must_be_bool() -> None:
    with pytest.raises(TypeError, match="`unimodal_heads` must be a bool, got 1"):
        LateFusionClassifier(SHAPES, CLASSES, unimodal_heads=1)
