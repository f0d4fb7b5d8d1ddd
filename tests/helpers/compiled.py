"""Compiling a style module the three ways users do, and the smallest module whose Inductor backward reuses buffers.

``ConvPool``'s visual encoder (conv, ReLU, adaptive average pooling, linear) is the kind whose Inductor backward, if
compiled with donated buffers, writes a gradient into the saved ReLU output in place: a second gradient of the same
forward is then wrong (``docs/compile.md``). It compiles in seconds on CPU.
"""

from __future__ import annotations

from typing import ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_mmbalance import ConcatFusion, MultimodalOutput
from tests.helpers.styles import FEATURE, NUM_CLASSES, StyleModule, mlp

COMPILE_STYLES = ("encoders", "module", "wrapped")
"""``torch.compile`` on each encoder, ``module.compile()``, and ``trainer.fit(torch.compile(module))``."""


def conv_pool() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(3),
        nn.Flatten(),
        nn.Linear(36, FEATURE),
        nn.ReLU(),
    )


class ConvPool(StyleModule):
    """``(audio, visual, label)`` tuples, an MLP audio encoder, a conv + pooling visual encoder, ConcatFusion."""

    shapes: ClassVar[dict[str, tuple[int, ...]]] = {"audio": (6,), "visual": (1, 6, 6)}

    def build(self) -> None:
        self.encoders = nn.ModuleDict({"audio": mlp(6), "visual": conv_pool()})
        self.fusion = ConcatFusion(dict.fromkeys(self.shapes, FEATURE), NUM_CLASSES)

    def forward(self, batch: tuple[Tensor, Tensor, Tensor]) -> MultimodalOutput:
        audio, visual, label = batch
        features = {"audio": self.encoders["audio"](audio), "visual": self.encoders["visual"](visual)}
        fused = self.fusion(features)
        return MultimodalOutput(fused.logits, fused.unimodal_logits, label, features)


def compiled(model: StyleModule, style: str, backend: str = "inductor") -> pl.LightningModule:
    """``model`` compiled in ``style`` (one of :data:`COMPILE_STYLES`); pass the result to ``trainer.fit``."""
    if style == "encoders":
        for m in list(model.encoders):
            model.encoders[m] = torch.compile(model.encoders[m], backend=backend)
        return model
    if style == "module":
        model.compile(backend=backend)
        return model
    if style == "wrapped":
        return torch.compile(model, backend=backend)  # type: ignore[return-value]
    raise ValueError(f"unknown compile style {style!r}, expected one of {COMPILE_STYLES}")


def plain_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of a model whichever way it was compiled (without the ``_orig_mod`` wrappers' prefixes)."""
    module = getattr(model, "_orig_mod", model)
    return {k.replace("._orig_mod", ""): v.detach().clone() for k, v in module.state_dict().items()}
