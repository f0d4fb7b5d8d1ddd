"""Masked evaluation without the module's help: encoder outputs zeroed by hooks, whatever the batch looks like."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_mmbalance import ModalityMonitor, MultimodalOutput, masked_forward
from lightning_mmbalance.masking import MaskingError, zeroed_encoders
from tests.helpers.harness import Logged
from tests.helpers.styles import STYLES, StyleData, encoder_modules
from tests.helpers.tiny import TinyData, TinyModel, fit


@pytest.mark.parametrize("style", list(STYLES))
def test_masked_output_equals_zero_features(style):
    """For every style, masking a modality equals running the fusion on zero features for it."""
    cls = STYLES[style]
    model = cls().eval()
    batch = next(iter(StyleData(cls, n=8).train_dataloader()))
    encoders = encoder_modules(model)
    masked = {model.modalities[0]}
    captured = {}
    handles = [
        enc.register_forward_hook(lambda mod, args, out, m=m: captured.setdefault(m, out))
        for m, enc in encoders.items()
    ]
    out = masked_forward(model, batch, masked, encoders)
    for h in handles:
        h.remove()
    for m in masked:  # the hooks registered before ours saw the real output; ours replaced it by zeros
        assert captured[m].abs().sum() > 0
    with torch.no_grad():
        feats = {m: encoders[m](x) for m, x in _inputs(style, batch).items()}
    assert torch.equal(out.features[model.modalities[0]], torch.zeros_like(feats[model.modalities[0]]))
    assert not any(enc._forward_hooks for enc in encoders.values())  # removed afterwards


def _inputs(style, batch):
    if style in ("tuple-concat-mlp", "zeromask-frozen"):
        return {"audio": batch[0], "visual": batch[1]}
    if style == "three-modalities":
        return dict(zip(("audio", "visual", "text"), batch[:3], strict=True))
    if style == "dataclass-heads-transformer":
        return {"audio": batch.audio, "visual": batch.visual}
    return {"audio": batch["audio"], "visual": batch["visual"]}


def test_hooks_removed_after_an_error():
    encoders = {"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}
    with pytest.raises(RuntimeError, match="boom"), zeroed_encoders(encoders, {"a"}):
        raise RuntimeError("boom")
    assert not encoders["a"]._forward_hooks
    with pytest.raises(KeyError, match=r"Cannot mask unknown modalities \['z'\]"), zeroed_encoders(encoders, {"z"}):
        pass


def test_module_masked_forward_is_an_override():
    class Own(TinyModel):
        def masked_forward(self, batch, masked):
            self.asked = masked
            return self(batch)

    model = Own()
    batch = next(iter(TinyData().train_dataloader()))
    masked_forward(model, batch, {"a"}, model.encoders)
    assert model.asked == frozenset({"a"})


class TupleEncoder(nn.Module):
    """An encoder that returns (features, attention map): its output cannot simply be zeroed."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, 5)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.linear(x)
        return h, torch.softmax(h, 1)


class TupleEncoders(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({"a": TupleEncoder(4), "b": TupleEncoder(6)}).double()

    def forward(self, batch):
        inputs, y = batch
        feats = {m: enc(inputs[m].double())[0] for m, enc in self.encoders.items()}
        logits = self.head(torch.cat(list(feats.values()), 1))
        return MultimodalOutput(logits, {m: logits for m in feats}, y, feats)


def test_encoder_returning_a_tuple_is_named():
    model = TupleEncoders()
    batch = next(iter(TinyData().train_dataloader()))
    with pytest.raises(MaskingError, match=r"modality 'a': its encoder \(TupleEncoder\) returns a tuple"):
        masked_forward(model, batch, {"a"}, model.encoders)


def test_monitor_skips_masking_with_one_warning():
    logged = Logged()
    with pytest.warns(UserWarning, match="ModalityMonitor skips masked accuracy.*returns a tuple") as record:
        _, model = fit([ModalityMonitor(), logged], model=TupleEncoders(), max_epochs=2, limit_val_batches=1.0)
    assert sum("skips masked" in str(w.message) for w in record) == 1
    assert any(k.startswith("mmbalance/monitor/val_acc/") for k in logged.keys)
    assert not any(k.startswith("mmbalance/monitor/masked_acc/") for k in logged.keys)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_encoder_that_never_runs_through_call_is_detected():
    class Bypass(TinyModel):
        def forward(self, batch):
            inputs, y = batch
            feats = {m: enc.forward(inputs[m].double()) for m, enc in self.encoders.items()}  # skips the hooks
            logits = self.head(torch.cat(list(feats.values()), 1))
            return MultimodalOutput(logits, {m: logits for m in feats}, y, feats)

    model = Bypass()
    batch = next(iter(TinyData().train_dataloader()))
    with pytest.raises(MaskingError, match=r"Cannot mask modalities \['b'\]: their encoders did not run through"):
        masked_forward(model, batch, {"b"}, model.encoders)
