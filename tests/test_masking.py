"""Masked evaluation without the module's help: encoder outputs zeroed by hooks, whatever the batch looks like."""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lightning_mmbalance import ModalityMonitor, MultimodalOutput, masked_forward
from lightning_mmbalance.masking import MaskingError, zeroed_encoders
from lightning_mmbalance.utilities.tree import map_tensors, tensor_leaves
from tests.helpers.harness import Logged
from tests.helpers.styles import STYLES, StyleData, encoder_modules
from tests.helpers.tiny import TinyData, TinyModel, fit


@pytest.mark.parametrize("style", list(STYLES))
def test_masked_output_equals_zero_features(style):
    """For every style, masking a modality gives the fusion zero features for it and the real ones for the others."""
    cls = STYLES[style]
    model = cls().eval()
    batch = next(iter(StyleData(cls, n=8).train_dataloader()))
    encoders = encoder_modules(model)
    first, *others = model.modalities
    captured = {}
    handles = [
        enc.register_forward_hook(lambda mod, args, out, m=m: captured.setdefault(m, out))
        for m, enc in encoders.items()
    ]
    with torch.no_grad():
        out = masked_forward(model, batch, {first}, encoders)
        full = model(batch)
    for h in handles:
        h.remove()
    # the hooks registered before ours saw the real output; ours replaced it by zeros
    assert any(t.abs().sum() > 0 for t in tensor_leaves(captured[first]))
    assert torch.equal(out.features[first], torch.zeros_like(full.features[first]))
    for m in others:
        assert torch.equal(out.features[m], full.features[m])
    assert not any(enc._forward_hooks for enc in encoders.values())  # removed afterwards


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


class Packed:
    """A user's own output class, neither a dataclass nor known to torch's pytree: no tensor can be found in it."""

    def __init__(self, h: Tensor) -> None:
        self.h = h


class WrappingEncoder(nn.Module):
    """An encoder that returns (features, attention map), or its features inside a ``Packed``."""

    def __init__(self, width: int, packed: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(width, 5)
        self.packed = packed

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor] | Packed:
        h = self.linear(x)
        return Packed(h) if self.packed else (h, torch.softmax(h, 1))


class WrappedOutputs(TinyModel):
    def __init__(self, packed: bool = False) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({"a": WrappingEncoder(4, packed), "b": WrappingEncoder(6, packed)}).double()

    def forward(self, batch):
        inputs, y = batch
        outputs = {m: enc(inputs[m].double()) for m, enc in self.encoders.items()}
        feats = {m: out.h if isinstance(out, Packed) else out[0] for m, out in outputs.items()}
        logits = self.head(torch.cat(list(feats.values()), 1))
        return MultimodalOutput(logits, {m: logits for m in feats}, y, feats)


def test_encoder_returning_a_tuple_is_masked():
    model = WrappedOutputs()
    batch = next(iter(TinyData().train_dataloader()))
    out, full = masked_forward(model, batch, {"a"}, model.encoders), model(batch)
    assert full.features["a"].abs().sum() > 0
    assert torch.equal(out.features["a"], torch.zeros_like(full.features["a"]))
    assert torch.equal(out.features["b"], full.features["b"])


def test_output_without_a_tensor_is_named():
    model = WrappedOutputs(packed=True)
    batch = next(iter(TinyData().train_dataloader()))
    with pytest.raises(
        MaskingError,
        match=r"modality 'a': its encoder \(WrappingEncoder\) returns a Packed in which no tensor was found",
    ):
        masked_forward(model, batch, {"a"}, model.encoders)


def test_monitor_skips_masking_with_one_warning():
    logged = Logged()
    with pytest.warns(UserWarning, match="ModalityMonitor skips masked accuracy.*returns a Packed") as record:
        _, model = fit(
            [ModalityMonitor(), logged], model=WrappedOutputs(packed=True), max_epochs=2, limit_val_batches=1.0
        )
    assert sum("skips masked" in str(w.message) for w in record) == 1
    assert any(k.startswith("mmbalance/monitor/val_acc/") for k in logged.keys)
    assert not any(k.startswith("mmbalance/monitor/masked_acc/") for k in logged.keys)
    assert all(torch.isfinite(p).all() for p in model.parameters())


Pair = namedtuple("Pair", ["features", "count"])


@dataclass(frozen=True)
class Frozen:
    """A dataclass torch's pytree does not know, frozen, with a field outside ``__init__``."""

    features: Tensor
    name: str
    extra: dict = field(default_factory=dict)
    derived: int = field(init=False, default=7)


def _structures() -> dict[str, object]:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    h, pooled = torch.randn(2, 3, 4), torch.randn(2, 4)
    return {
        "tensor": h,
        "model-output": BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=pooled),
        "dict": {"h": h, "meta": {"ids": torch.arange(3), "tag": "x", "n": 2, "none": None}},
        "tuple-list": (h, [pooled, None, 3.5]),
        "namedtuple": Pair(h, 4),
        "dataclass": Frozen(h, "text", {"pooled": (pooled,)}),
    }


@pytest.mark.parametrize("kind", list(_structures()))
def test_every_tensor_of_a_structure_is_zeroed_and_nothing_else(kind):
    original = _structures()[kind]
    before = [t.clone() for t in tensor_leaves(original)]
    zeroed = map_tensors(torch.zeros_like, original)
    assert type(zeroed) is type(original)
    leaves = tensor_leaves(zeroed)
    assert [t.shape for t in leaves] == [t.shape for t in before] and len(leaves) >= 1
    assert all(not t.any() for t in leaves)
    assert all(torch.equal(a, b) for a, b in zip(tensor_leaves(original), before, strict=True))  # left untouched
    if kind == "dataclass":
        assert (zeroed.name, zeroed.derived, zeroed.extra.keys()) == ("text", 7, {"pooled"})
    else:
        assert _other_leaves(zeroed) == _other_leaves(original)


def _other_leaves(tree: object) -> list[object]:
    return [v for v in pytree.tree_leaves(tree) if not isinstance(v, Tensor)]


def test_model_output_keeps_keys_attributes_indices_and_none_fields():
    original = _structures()["model-output"]
    zeroed = map_tensors(torch.zeros_like, original)
    assert list(zeroed.keys()) == list(original.keys()) == ["last_hidden_state", "pooler_output"]
    assert zeroed.hidden_states is None and zeroed.attentions is None
    assert zeroed[0] is zeroed.last_hidden_state is zeroed["last_hidden_state"]
    assert zeroed.to_tuple()[1] is zeroed.pooler_output
    assert not zeroed.pooler_output.any()


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
