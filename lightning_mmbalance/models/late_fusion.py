"""The reference late-fusion classifier: one encoder per modality, a fusion head, and the contract's forward."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_mmbalance.contract import MultimodalOutput
from lightning_mmbalance.fusion import BIAS_MODES, ConcatFusion, SumFusion
from lightning_mmbalance.loss import multimodal_loss
from lightning_mmbalance.utilities.checks import check_bool, check_choice, check_float, check_int

__all__ = ["LateFusionClassifier"]

Batch = tuple[Mapping[str, Tensor], Tensor]

_FUSIONS = ("concat", "sum")
_OPTIMIZERS = ("sgd", "adam", "adamw")


def _encoder(modality: str, shape: Sequence[int], feature_dim: int, hidden_dim: int) -> nn.Module:
    """An MLP for a vector modality ``[D]``, a small strided CNN for an image modality ``[C, H, W]``; no BatchNorm."""
    valid = isinstance(shape, Sequence) and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape
    )
    if valid and len(shape) == 1:
        return nn.Sequential(nn.Linear(shape[0], hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, feature_dim), nn.ReLU())
    if valid and len(shape) == 3:
        channels, height, width = shape
        # Two 3x3 convolutions, the second with stride 2, then a Linear over the flattened map: it keeps the spatial
        # layout that global pooling would lose (a pooled CNN barely beats chance on 8x8 digits).
        return nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * ((height + 1) // 2) * ((width + 1) // 2), feature_dim),
            nn.ReLU(),
        )
    raise ValueError(
        f"The input shape of modality {modality!r} must be [D] (a vector) or [C, H, W] (an image) of positive ints "
        f"(without the batch dimension), got {shape!r}."
    )


class LateFusionClassifier(pl.LightningModule):
    """Reference late-fusion classifier satisfying the balancing callbacks' contract, for any number of modalities.

    Each modality has its own encoder in ``self.encoders`` (an ``nn.ModuleDict``): an MLP
    ``Linear(D, hidden_dim) -> ReLU -> Linear(hidden_dim, feature_dim) -> ReLU`` for a vector input ``[D]``, a small
    CNN (two 3x3 convs with 16 and 32 channels, the second with stride 2, then ``Linear(flattened map, feature_dim) ->
    ReLU``) for an image ``[C, H, W]``. The encoders have no BatchNorm, so that DDP and one process train
    identically. The features go to ``self.fusion``, a :class:`~lightning_mmbalance.fusion.ConcatFusion` or
    :class:`~lightning_mmbalance.fusion.SumFusion`, which gives the fused and the unimodal logits. With
    ``unimodal_heads=True`` the unimodal logits come from separate heads ``self.unimodal_heads[m]``
    (``Linear(feature_dim, num_classes)``, as in MMPareto's official model) instead.

    A batch is ``(inputs, targets)`` with ``inputs`` a dict modality -> ``(B, *shape)`` tensor and ``targets``
    ``(B,)`` class indices. ``training_step`` returns :func:`~lightning_mmbalance.contract.multimodal_loss`, so every
    balancing callback works with it. Logged, per epoch: ``{stage}/acc`` (fused accuracy) and ``{stage}/acc_{m}``
    (accuracy of modality ``m``'s unimodal logits) for ``stage`` in ``train``, ``val``, ``test``; ``val/loss`` and
    ``test/loss`` (fused cross-entropy); ``train/loss`` (the loss returned by ``multimodal_loss``), per step and per
    epoch (the loggers see ``train/loss_step`` and ``train/loss_epoch``).

    Args:
        input_shapes: modality -> input shape without the batch dimension, ``[D]`` or ``[C, H, W]``.
        num_classes: number of classes, int >= 2.
        feature_dim: width of every encoder's output, int >= 1.
        hidden_dim: hidden width of the MLP encoders, int >= 1.
        fusion: ``"concat"`` (:class:`~lightning_mmbalance.fusion.ConcatFusion`) or ``"sum"``
            (:class:`~lightning_mmbalance.fusion.SumFusion`).
        bias: for ``fusion="concat"``, ``"split"`` (the bias split equally across the unimodal logits, OGM-GE's
            convention) or ``"whole"`` (each unimodal logit keeps the whole bias, ARL's convention); unused by
            ``"sum"``.
        unimodal_heads: take the unimodal logits from separate per-modality linear heads.
        optimizer: ``"sgd"`` (with ``momentum``; the papers' choice), ``"adam"`` or ``"adamw"``.
        lr: learning rate, float > 0.
        momentum: SGD momentum, float in [0, 1); unused by Adam and AdamW.
        weight_decay: weight decay, float >= 0.

    Raises:
        ValueError: an argument outside the range given above.
        TypeError: ``unimodal_heads`` is not a bool.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mmbalance import OGMGE
        from lightning_mmbalance.models import LateFusionClassifier

        dm = ...  # a LightningDataModule with `input_shapes` and `num_classes`, e.g. a built-in one
        Trainer(max_epochs=30, callbacks=[OGMGE(alpha=0.8)]).fit(
            LateFusionClassifier(dm.input_shapes, dm.num_classes), datamodule=dm
        )
    """

    def __init__(
        self,
        input_shapes: dict[str, list[int]],
        num_classes: int,
        feature_dim: int = 64,
        hidden_dim: int = 128,
        fusion: str = "concat",
        bias: str = "split",
        unimodal_heads: bool = False,
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
    ) -> None:
        super().__init__()
        if not isinstance(input_shapes, Mapping) or not input_shapes:
            raise ValueError(
                f"`input_shapes` must be a non-empty mapping modality -> input shape, got {input_shapes!r}."
            )
        check_int("num_classes", num_classes, 2)
        check_int("feature_dim", feature_dim, 1)
        check_int("hidden_dim", hidden_dim, 1)
        check_choice("fusion", fusion, _FUSIONS)
        check_choice("bias", bias, BIAS_MODES)
        check_choice("optimizer", optimizer, _OPTIMIZERS)
        check_bool("unimodal_heads", unimodal_heads)
        check_float("lr", lr, 0.0, min_open=True)
        check_float("momentum", momentum, 0.0, 1.0, max_open=True)
        check_float("weight_decay", weight_decay, 0.0)
        self.save_hyperparameters()

        self.encoders = nn.ModuleDict(
            {m: _encoder(m, shape, feature_dim, hidden_dim) for m, shape in input_shapes.items()}
        )
        widths = dict.fromkeys(self.encoders, feature_dim)
        self.fusion = (
            ConcatFusion(widths, num_classes, bias=bias) if fusion == "concat" else SumFusion(widths, num_classes)
        )
        self.unimodal_heads = (
            nn.ModuleDict({m: nn.Linear(feature_dim, num_classes) for m in self.encoders}) if unimodal_heads else None
        )
        # one accuracy per (stage, head), keyed by the logged name after "{stage}/"
        names = ["acc", *(f"acc_{m}" for m in self.encoders)]
        self.train_metrics, self.val_metrics, self.test_metrics = (
            nn.ModuleDict({name: MulticlassAccuracy(num_classes, average="micro") for name in names}) for _ in range(3)
        )

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modality names, in encoder order."""
        return tuple(self.encoders)

    def forward(self, batch: Batch) -> MultimodalOutput:
        """Encode every modality and fuse.

        Args:
            batch: ``(inputs, targets)``, ``inputs`` a dict modality -> ``(B, *input_shape)``, ``targets`` ``(B,)``.

        Returns:
            The fused and unimodal logits, the targets and the encoder features.

        Raises:
            ValueError: ``inputs`` lacks a modality.
        """
        return self.masked_forward(batch, frozenset())

    def masked_forward(self, batch: Batch, masked: frozenset[str]) -> MultimodalOutput:
        """Forward with the encoder features of the modalities in ``masked`` replaced by zeros.

        :class:`~lightning_mmbalance.ModalityMonitor` uses it for its masked accuracy and Shapley values. The zeroed
        features may be out of distribution for the fusion head; the results are indicators.

        Args:
            batch: ``(inputs, targets)`` as for :meth:`forward`.
            masked: the modalities whose features are zeroed.

        Returns:
            The output computed from the (partly zeroed) features, which are also returned as ``features``.

        Raises:
            ValueError: ``inputs`` lacks a modality, or ``masked`` names an unknown one.
        """
        inputs, targets = batch
        missing = [m for m in self.encoders if m not in inputs]
        if missing:
            raise ValueError(
                f"The batch lacks the modalities {missing}: the inputs have {list(inputs)}, the model expects "
                f"{list(self.encoders)}."
            )
        unknown = set(masked) - set(self.encoders)
        if unknown:
            raise ValueError(f"Cannot mask unknown modalities {sorted(unknown)}; the model has {list(self.encoders)}.")
        features = {m: encoder(inputs[m]) for m, encoder in self.encoders.items()}
        features = {m: torch.zeros_like(f) if m in masked else f for m, f in features.items()}
        logits, unimodal = self.fusion(features)
        if self.unimodal_heads is not None:
            unimodal = {m: head(features[m]) for m, head in self.unimodal_heads.items()}
        return MultimodalOutput(logits=logits, unimodal_logits=unimodal, targets=targets, features=features)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Return the balancing-aware loss and log ``train/loss`` and the training accuracies."""
        output = self(batch)
        loss = multimodal_loss(self, output)
        self.log("train/loss", loss, on_step=True, on_epoch=True, sync_dist=True, batch_size=len(output.targets))
        self._log_accuracy("train", output)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Log ``val/loss`` (fused cross-entropy) and the validation accuracies."""
        self._evaluate("val", batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Log ``test/loss`` (fused cross-entropy) and the test accuracies."""
        self._evaluate("test", batch)

    def _evaluate(self, stage: str, batch: Batch) -> None:
        output = self(batch)
        loss = F.cross_entropy(output.logits, output.targets)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=len(output.targets))
        self._log_accuracy(stage, output)

    def _log_accuracy(self, stage: str, output: MultimodalOutput) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        predictions = {"acc": output.logits, **{f"acc_{m}": z for m, z in output.unimodal_logits.items()}}
        for name, logits in predictions.items():
            metric = metrics[name]
            metric.update(logits.detach(), output.targets)
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with momentum (default), Adam or AdamW over all parameters, with ``lr`` and ``weight_decay``."""
        hp = self.hparams
        lr, weight_decay = hp["lr"], hp["weight_decay"]
        if hp["optimizer"] == "sgd":
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=hp["momentum"], weight_decay=weight_decay)
        optimizer = torch.optim.Adam if hp["optimizer"] == "adam" else torch.optim.AdamW
        return optimizer(self.parameters(), lr=lr, weight_decay=weight_decay)
