"""Multimodal LightningModules written the way users write them, unlike the package's reference model.

Each style differs from ``LateFusionClassifier`` in several ways at once: the batch structure (tuples, dicts, a
dataclass), the fusion (concat, sum, separate unimodal heads, ``ZeroMaskFusion`` around a user head, a small attention
fusion with its own unimodal heads), the encoders (MLP, conv + BatchNorm, ``nn.TransformerEncoder``, a frozen
pretrained-like part, ``transformers`` models that return a ``ModelOutput``), where the encoders live (a
``ModuleDict`` or dotted paths) and the number of modalities. None of them defines ``masked_forward``. Everything is
module level, so that ``ddp_fork`` and pickling work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_mmbalance import ConcatFusion, MultimodalOutput, SumFusion, ZeroMaskFusion, multimodal_loss

NUM_CLASSES = 3
FEATURE = 6
IMAGE, TOKENS, VOCAB, HIDDEN = (1, 8, 8), 6, 16, 16  # the Hugging Face style's sizes


# ---------------------------------------------------------------------------------------------- encoders
def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 8), nn.ReLU(), nn.Linear(8, FEATURE))


def conv_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, FEATURE)
    )


class TokenTransformer(nn.Module):
    """(B, T, 5) tokens -> a 1-layer TransformerEncoder (no dropout) -> mean over tokens -> (B, FEATURE)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.out = nn.Linear(8, FEATURE)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.encoder(self.embed(x)).mean(1))


class FrozenStem(nn.Module):
    """A pretrained-like frozen first layer, then a trainable one."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Linear(width, 8)
        self.stem.requires_grad_(False)
        self.head = nn.Linear(8, FEATURE)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.stem(x)))


# ---------------------------------------------------------------------------------------------- fusions
class MLPHead(nn.Module):
    """A user's fusion head: concat -> hidden -> logits, called with a dict modality -> features."""

    def __init__(self, modalities: tuple[str, ...]) -> None:
        super().__init__()
        self.modalities = modalities
        self.net = nn.Sequential(nn.Linear(FEATURE * len(modalities), 8), nn.Tanh(), nn.Linear(8, NUM_CLASSES))

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        return self.net(torch.cat([features[m] for m in self.modalities], 1))


class AttentionFusion(nn.Module):
    """Each modality a token, one multi-head attention layer, mean pooling, a linear classifier."""

    def __init__(self, modalities: tuple[str, ...]) -> None:
        super().__init__()
        self.modalities = modalities
        self.attention = nn.MultiheadAttention(FEATURE, num_heads=2, batch_first=True)
        self.classifier = nn.Linear(FEATURE, NUM_CLASSES)

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        tokens = torch.stack([features[m] for m in self.modalities], 1)
        mixed, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.classifier(mixed.mean(1))


# ---------------------------------------------------------------------------------------------- batches and data
@dataclass
class AVBatch:
    """A dataclass batch, as produced by a custom collate function."""

    audio: Tensor
    visual: Tensor
    label: Tensor


def collate_dataclass(samples: list[tuple[Tensor, Tensor, Tensor]]) -> AVBatch:
    audio, visual, label = zip(*samples, strict=True)
    return AVBatch(torch.stack(audio), torch.stack(visual), torch.stack(label))


def collate_dict(samples: list[tuple[Tensor, ...]], names: tuple[str, ...]) -> dict[str, Tensor]:
    columns = list(zip(*samples, strict=True))
    return {name: torch.stack(list(col)) for name, col in zip((*names, "label"), columns, strict=True)}


class Samples(Dataset):
    """Class-conditional inputs of the given per-modality shapes; the first modality is the strong one."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % NUM_CLASSES
        self.x = []
        for i, shape in enumerate(shapes.values()):
            means = torch.randn(NUM_CLASSES, *shape, generator=torch.Generator().manual_seed(100 + i))
            signal = 1.5 if i == 0 else 0.4
            self.x.append(signal * means[self.y] + torch.randn(n, *shape, generator=g))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        return (*(x[i] for x in self.x), self.y[i])


class StyleData(pl.LightningDataModule):
    """Unshuffled loaders with the style's collate; under DDP rank r takes samples r, r + 2, ... (no padding)."""

    def __init__(self, style: type[StyleModule], n: int = 48, batch_size: int = 8) -> None:
        super().__init__()
        self.style = style
        self.train_set = style.samples(n, seed=0)
        self.val_set = style.samples(n // 2, seed=1)
        self.batch_size = batch_size

    def _loader(self, dataset: Dataset, sharded: bool) -> DataLoader:
        sampler = None
        if sharded and self.trainer is not None and self.trainer.world_size > 1:
            sampler = DistributedSampler(
                dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
            )
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=self.style.collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, sharded=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, sharded=False)


# ---------------------------------------------------------------------------------------------- modules
class StyleModule(pl.LightningModule):
    """What the styles share: the training/validation steps and SGD. Subclasses build the network and the forward."""

    shapes: ClassVar[dict[str, tuple[int, ...]]] = {}
    encoder_paths: ClassVar[dict[str, str] | None] = None  # None: the module has `self.encoders`, a ModuleDict
    collate: ClassVar[Callable[[list[Any]], Any] | None] = None

    def __init__(self, seed: int = 0, lr: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lr = lr
        self.build()

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.shapes)

    @classmethod
    def samples(cls, n: int, seed: int) -> Dataset:
        """The style's data set: tensors of ``shapes`` by default."""
        return Samples(cls.shapes, n, seed)

    def build(self) -> None:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return multimodal_loss(self, self(batch))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        output = self(batch)
        self.log("val/acc", (output.logits.argmax(1) == output.targets).float().mean(), batch_size=len(output.targets))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)


class TupleConcat(StyleModule):
    """``(audio, visual, label)`` tuples, MLP encoders in a ModuleDict, ConcatFusion."""

    shapes: ClassVar[dict[str, tuple[int, ...]]] = {"audio": (6,), "visual": (5,)}

    def build(self) -> None:
        self.encoders = nn.ModuleDict({m: mlp(s[0]) for m, s in self.shapes.items()})
        self.fusion = ConcatFusion(dict.fromkeys(self.shapes, FEATURE), NUM_CLASSES)

    def forward(self, batch: tuple[Tensor, Tensor, Tensor]) -> MultimodalOutput:
        audio, visual, label = batch
        features = {"audio": self.encoders["audio"](audio), "visual": self.encoders["visual"](visual)}
        fused = self.fusion(features)
        return MultimodalOutput(fused.logits, fused.unimodal_logits, label, features)


class DictSumConvBN(StyleModule):
    """``{"audio", "visual", "label"}`` dict batches, a conv + BatchNorm visual encoder, SumFusion."""

    shapes: ClassVar[dict[str, tuple[int, ...]]] = {"audio": (6,), "visual": (1, 6, 6)}

    @staticmethod
    def collate(samples: list[tuple[Tensor, ...]]) -> dict[str, Tensor]:
        return collate_dict(samples, ("audio", "visual"))

    def build(self) -> None:
        self.encoders = nn.ModuleDict({"audio": mlp(6), "visual": conv_bn()})
        self.fusion = SumFusion(dict.fromkeys(self.shapes, FEATURE), NUM_CLASSES)

    def forward(self, batch: dict[str, Tensor]) -> MultimodalOutput:
        features = {m: self.encoders[m](batch[m]) for m in self.modalities}
        fused = self.fusion(features)
        return MultimodalOutput(fused.logits, fused.unimodal_logits, batch["label"], features)


class DataclassHeadsTransformer(StyleModule):
    """A dataclass batch, a TransformerEncoder audio encoder, a fused head and separate unimodal heads."""

    shapes: ClassVar[dict[str, tuple[int, ...]]] = {"audio": (4, 5), "visual": (6,)}
    collate = staticmethod(collate_dataclass)

    def build(self) -> None:
        self.encoders = nn.ModuleDict({"audio": TokenTransformer(), "visual": mlp(6)})
        self.fused_head = nn.Linear(2 * FEATURE, NUM_CLASSES)
        self.unimodal_heads = nn.ModuleDict({m: nn.Linear(FEATURE, NUM_CLASSES) for m in self.shapes})

    def forward(self, batch: AVBatch) -> MultimodalOutput:
        features = {"audio": self.encoders["audio"](batch.audio), "visual": self.encoders["visual"](batch.visual)}
        logits = self.fused_head(torch.cat([features["audio"], features["visual"]], 1))
        unimodal = {m: self.unimodal_heads[m](f) for m, f in features.items()}
        return MultimodalOutput(logits, unimodal, batch.label, features)


class ZeroMaskFrozen(StyleModule):
    """Tuples, encoders with a frozen pretrained-like stem, a user's MLP head wrapped in ZeroMaskFusion."""

    shapes: ClassVar[dict[str, tuple[int, ...]]] = {"audio": (6,), "visual": (5,)}

    def build(self) -> None:
        self.encoders = nn.ModuleDict({m: FrozenStem(s[0]) for m, s in self.shapes.items()})
        self.fusion = ZeroMaskFusion(MLPHead(self.modalities), self.modalities)

    def forward(self, batch: tuple[Tensor, Tensor, Tensor]) -> MultimodalOutput:
        audio, visual, label = batch
        features = {"audio": self.encoders["audio"](audio), "visual": self.encoders["visual"](visual)}
        fused = self.fusion(features)
        return MultimodalOutput(fused.logits, fused.unimodal_logits, label, features)


class AttentionPaths(StyleModule):
    """Dict batches, encoders at dotted paths (no ModuleDict), attention fusion with its own unimodal heads."""

    shapes: ClassVar[dict[str, tuple[int, ...]]] = {"audio": (6,), "visual": (5,)}
    encoder_paths: ClassVar[dict[str, str] | None] = {"audio": "audio_net", "visual": "backbone.visual"}

    @staticmethod
    def collate(samples: list[tuple[Tensor, ...]]) -> dict[str, Tensor]:
        return collate_dict(samples, ("audio", "visual"))

    def build(self) -> None:
        self.audio_net = mlp(6)
        self.backbone = nn.Module()
        self.backbone.visual = mlp(5)
        self.fusion = AttentionFusion(self.modalities)
        self.heads = nn.ModuleDict({m: nn.Linear(FEATURE, NUM_CLASSES) for m in self.shapes})

    def forward(self, batch: dict[str, Tensor]) -> MultimodalOutput:
        features = {"audio": self.audio_net(batch["audio"]), "visual": self.backbone.visual(batch["visual"])}
        unimodal = {m: self.heads[m](f) for m, f in features.items()}
        return MultimodalOutput(self.fusion(features), unimodal, batch["label"], features)


class ThreeModalities(StyleModule):
    """``(x1, x2, x3, label)`` tuples, three MLP encoders, ConcatFusion keeping the whole bias."""

    shapes: ClassVar[dict[str, tuple[int, ...]]] = {"audio": (6,), "visual": (5,), "text": (4,)}

    def build(self) -> None:
        self.encoders = nn.ModuleDict({m: mlp(s[0]) for m, s in self.shapes.items()})
        self.fusion = ConcatFusion(dict.fromkeys(self.shapes, FEATURE), NUM_CLASSES, bias="whole")

    def forward(self, batch: tuple[Tensor, ...]) -> MultimodalOutput:
        *inputs, label = batch
        features = {m: enc(x) for (m, enc), x in zip(self.encoders.items(), inputs, strict=True)}
        fused = self.fusion(features)
        return MultimodalOutput(fused.logits, fused.unimodal_logits, label, features)


class ImageTextSamples(Dataset):
    """Class-conditional 1 x 8 x 8 images (the strong modality) and padded token sequences (the weak one).

    Each item is a dict as a Hugging Face processor returns it: ``pixel_values``, ``input_ids`` (0 is padding) and
    ``attention_mask``, with the ``label``.
    """

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % NUM_CLASSES
        means = torch.randn(NUM_CLASSES, *IMAGE, generator=torch.Generator().manual_seed(100))
        self.pixels = 1.5 * means[y] + torch.randn(n, *IMAGE, generator=g)
        band = 1 + 4 * y[:, None] + torch.randint(0, 4, (n, TOKENS), generator=g)  # each class favours 4 tokens
        ids = torch.where(
            torch.rand(n, TOKENS, generator=g) < 0.3, band, torch.randint(1, VOCAB, (n, TOKENS), generator=g)
        )
        lengths = torch.randint(TOKENS - 2, TOKENS + 1, (n,), generator=g)
        self.mask = (torch.arange(TOKENS) < lengths[:, None]).long()
        self.ids, self.y = ids * self.mask, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "pixel_values": self.pixels[i],
            "input_ids": self.ids[i],
            "attention_mask": self.mask[i],
            "label": self.y[i],
        }


class HuggingFaceImageText(StyleModule):
    """``transformers`` encoders from tiny configs: a ViT (no pooler) and a BERT, both returning ``ModelOutput`` s.

    Dict batches as a processor gives them; the fusion reads the image's class token (``last_hidden_state[:, 0]``)
    and the text's ``pooler_output``, as ``ViTForImageClassification`` and ``BertForSequenceClassification`` do, into
    ConcatFusion. Dropout is off, so that runs can be compared exactly.
    """

    shapes: ClassVar[dict[str, tuple[int, ...]]] = {"image": IMAGE, "text": (TOKENS,)}

    @classmethod
    def samples(cls, n: int, seed: int) -> Dataset:
        return ImageTextSamples(n, seed)

    def build(self) -> None:
        from transformers import BertConfig, BertModel, ViTConfig, ViTModel

        sizes = {"hidden_size": HIDDEN, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
        no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
        vit = ViTConfig(image_size=IMAGE[1], patch_size=4, num_channels=IMAGE[0], **sizes, **no_dropout)
        bert = BertConfig(vocab_size=VOCAB, max_position_embeddings=TOKENS, type_vocab_size=1, **sizes, **no_dropout)
        self.encoders = nn.ModuleDict({"image": ViTModel(vit, add_pooling_layer=False), "text": BertModel(bert)})
        self.fusion = ConcatFusion(dict.fromkeys(self.shapes, HIDDEN), NUM_CLASSES)

    def forward(self, batch: dict[str, Tensor]) -> MultimodalOutput:
        image = self.encoders["image"](pixel_values=batch["pixel_values"])
        text = self.encoders["text"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        features = {"image": image.last_hidden_state[:, 0], "text": text.pooler_output}
        fused = self.fusion(features)
        return MultimodalOutput(fused.logits, fused.unimodal_logits, batch["label"], features)


STYLES: dict[str, type[StyleModule]] = {
    "tuple-concat-mlp": TupleConcat,
    "dict-sum-convbn": DictSumConvBN,
    "dataclass-heads-transformer": DataclassHeadsTransformer,
    "zeromask-frozen": ZeroMaskFrozen,
    "attention-paths": AttentionPaths,
    "three-modalities": ThreeModalities,
    "huggingface-image-text": HuggingFaceImageText,
}


def encoder_modules(model: StyleModule) -> dict[str, nn.Module]:
    """The style's encoders, resolved as the callbacks resolve them."""
    from lightning_mmbalance.contract import resolve_encoders

    return resolve_encoders(model, model.encoder_paths)
