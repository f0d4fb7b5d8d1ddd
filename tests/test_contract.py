import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_mmbalance import MultimodalOutput, multimodal_loss
from lightning_mmbalance.contract import resolve_encoders, validate_output
from tests.helpers.tiny import ShareCallback, TinyData, TinyModel, trainer_kwargs


def _output(b=4, c=3, keys=("a", "b"), targets=None):
    g = torch.Generator().manual_seed(0)
    return MultimodalOutput(
        logits=torch.randn(b, c, generator=g),
        unimodal_logits={k: torch.randn(b, c, generator=g) for k in keys},
        targets=torch.tensor([0, 1, 2, 0][:b]) if targets is None else targets,
    )


def test_outside_trainer_is_fused_loss():
    out = _output()
    model = TinyModel()
    torch.testing.assert_close(multimodal_loss(model, out), nn.functional.cross_entropy(out.logits, out.targets))


def test_custom_criterion():
    out = _output()
    loss = multimodal_loss(TinyModel(), out, criterion=lambda z, y: z.sum() * 0 + 7.0)
    assert float(loss) == 7.0


@pytest.mark.parametrize(
    ("output", "error", "match"),
    [
        (
            _output(keys=("a", "c")),
            ValueError,
            r"modality keys .*\['a', 'c'\] differ from the encoders' modalities \['a', 'b'\]",
        ),
        (_output(targets=torch.tensor([0.0, 1.0, 2.0, 0.0])), TypeError, "integer class indices.*torch.float32"),
        (_output(targets=torch.tensor([0, 1, 2])), ValueError, r"targets` must have shape \(4,\)"),
        (_output(targets=torch.tensor([0, 1, 3, 0])), ValueError, r"must lie in \[0, 3\), got values in \[0, 3\]"),
        ("not an output", TypeError, "Expected a MultimodalOutput, got str"),
    ],
)
def test_validation_errors(output, error, match):
    with pytest.raises(error, match=match):
        multimodal_loss(TinyModel(), output)


def test_shape_errors():
    out = _output()
    with pytest.raises(ValueError, match=r"logits` must be \(B, C\)"):
        validate_output(MultimodalOutput(out.logits[0], {}, out.targets))
    bad = MultimodalOutput(out.logits, {"a": out.logits, "b": out.logits[:, :2]}, out.targets)
    with pytest.raises(ValueError, match=r"unimodal_logits\['b'\]` has shape \(4, 2\)"):
        validate_output(bad)
    feats = MultimodalOutput(out.logits, {}, out.targets, features={"a": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match=r"features\['a'\]` has shape \(3, 2\)"):
        validate_output(feats)
    feats = MultimodalOutput(out.logits, {}, out.targets, features={"z": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match=r"keys of `MultimodalOutput.features` \['z'\]"):
        validate_output(feats, ("a", "b"))
    feats = MultimodalOutput(out.logits, {}, out.targets, features={"a": {"pooler_output": torch.zeros(4, 2)}})
    with pytest.raises(TypeError, match=r"features\['a'\]` must be a \(B, D\) tensor, got a dict.*pooler_output"):
        validate_output(feats)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.audio_net = nn.Linear(2, 2)
        self.backbone = nn.Module()
        self.backbone.visual = nn.Linear(2, 2)


def test_resolve_encoders_paths_and_errors():
    model = Plain()
    enc = resolve_encoders(model, {"audio": "audio_net", "visual": "backbone.visual"})
    assert list(enc) == ["audio", "visual"] and enc["visual"] is model.backbone.visual
    with pytest.raises(AttributeError, match=r"`Plain` has no `encoders` attribute.*encoders=\{"):
        resolve_encoders(model)
    with pytest.raises(AttributeError, match=r"'backbone.audio' of modality 'audio' does not exist: `Plain.backbone`"):
        resolve_encoders(model, {"audio": "backbone.audio", "visual": "backbone.visual"})
    with pytest.raises(ValueError, match="at least 2 modalities"):
        resolve_encoders(model, {"audio": "audio_net"})
    with pytest.raises(ValueError, match="'audio' and 'visual' share parameters"):
        resolve_encoders(model, {"audio": "backbone", "visual": "backbone.visual"})
    model.encoders = [model.audio_net]
    with pytest.raises(TypeError, match="must be an `nn.ModuleDict`"):
        resolve_encoders(model)
    model.weight = nn.Parameter(torch.zeros(1))
    with pytest.raises(TypeError, match="points to a Parameter, not an nn.Module"):
        resolve_encoders(model, {"audio": "weight", "visual": "audio_net"})
    model.empty = nn.ReLU()
    with pytest.raises(ValueError, match="modality 'audio' .ReLU. has no parameters"):
        resolve_encoders(model, {"audio": "empty", "visual": "audio_net"})


def test_missing_multimodal_loss_call_names_the_line():
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[ShareCallback()]))
    with pytest.raises(
        RuntimeError, match=r"`TinyModel.training_step` must end with `return multimodal_loss\(self, output\)`"
    ):
        trainer.fit(TinyModel(call_loss=False), datamodule=TinyData())


def test_missing_encoders_attribute_in_setup():
    model = TinyModel(encoder_attr="nets")
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[ShareCallback()]))
    with pytest.raises(AttributeError, match="ShareCallback: `TinyModel` has no `encoders` attribute"):
        trainer.fit(model, datamodule=TinyData())
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[ShareCallback(encoders={"a": "nets.a", "b": "nets.b"})]))
    trainer.fit(model, datamodule=TinyData())
