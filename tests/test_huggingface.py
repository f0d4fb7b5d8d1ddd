"""Hugging Face encoders: ``transformers`` models built from tiny configs, whose forward returns a ``ModelOutput``.

Every callback of the shared table runs on the ``huggingface-image-text`` style in the conformance matrix
(``tests/test_conformance.py``). Here: masking keeps a ``ModelOutput`` a ``ModelOutput``; the monitor computes its
masked measurements (no skip warning); two DDP processes equal one; compiled encoders equal eager ones; FSDP2 with each
encoder sharded by ``fully_shard`` equals one process. The distributed and compiled runs take the callbacks that read
the encoders' outputs or run the encoders again: MMPareto (a second gradient through the outputs every step), the
monitor (its conflict test's second gradients, masked evaluation, the probes' feature passes) and Diagnosing &
Re-learning (feature passes gathered across ranks, then the encoders moved).
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.distributed.fsdp import fully_shard

from lightning_mmbalance import MMPareto, ModalityMonitor, MultimodalOutput
from lightning_mmbalance.callbacks.heldout import collect_features
from lightning_mmbalance.masking import zeroed_encoders
from tests.helpers.harness import CALLBACKS, Logged, logged_prefixes_present
from tests.helpers.sharded import AssertSharded, ForkModelParallel, SaveFullParams
from tests.helpers.styles import HuggingFaceImageText, StyleData
from tests.helpers.tiny import SaveParams, assert_states_close, load_ranks, trainer_kwargs

STYLE = HuggingFaceImageText


class ShardedHuggingFace(HuggingFaceImageText):
    """The style with each ``transformers`` encoder, then the module, sharded by FSDP2."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for encoder in self.encoders.values():
            fully_shard(encoder, mesh=mesh)
        fully_shard(self, mesh=mesh)


def _fit(name: str, model: pl.LightningModule, batch_size: int = 8, extra: tuple = (), **overrides) -> dict:
    case = CALLBACKS[name]
    logged = Logged()
    kw = trainer_kwargs(
        callbacks=[*case.factory(None), *extra, logged], max_epochs=case.epochs, limit_val_batches=1.0, **overrides
    )
    pl.Trainer(**kw).fit(model, datamodule=StyleData(STYLE, n=32, batch_size=batch_size))
    if kw.get("devices", 1) == 1:
        assert not logged_prefixes_present(logged.keys, case.tags), sorted(logged.keys)
    return {k.replace("._orig_mod", ""): v.detach() for k, v in model.state_dict().items()}


def test_zeroed_encoders_return_their_model_output_class():
    model = STYLE().eval()
    batch = next(iter(StyleData(STYLE, n=8).train_dataloader()))
    text = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        full = model.encoders["text"](**text)
        with zeroed_encoders(model.encoders, {"image", "text"}) as called:
            zeroed = model.encoders["text"](**text)
            image = model.encoders["image"](pixel_values=batch["pixel_values"])
    assert called == {"image", "text"}
    assert type(zeroed) is type(full) and list(zeroed.keys()) == list(full.keys())
    assert zeroed.pooler_output.shape == full.pooler_output.shape and full.pooler_output.any()
    assert not zeroed.pooler_output.any() and not zeroed["last_hidden_state"].any()
    assert zeroed[0] is zeroed.last_hidden_state and zeroed.attentions is None
    assert image.pooler_output is None and not image.last_hidden_state.any()  # a ViT without a pooler


def test_monitor_masked_measurements_are_computed():
    logged = Logged()
    monitor = ModalityMonitor()
    kw = trainer_kwargs(callbacks=[monitor, logged], max_epochs=1, limit_val_batches=1.0)
    trainer = pl.Trainer(**kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(STYLE(), datamodule=StyleData(STYLE, n=32))
    assert not [str(w.message) for w in caught if "skips masked" in str(w.message)]
    for quantity in ("masked_acc", "utilization", "shapley"):
        for modality in STYLE.shapes:
            assert torch.isfinite(trainer.callback_metrics[f"mmbalance/monitor/{quantity}/{modality}"])


def test_feature_pass_names_a_model_output_given_as_features():
    model = STYLE().eval()
    batch = next(iter(StyleData(STYLE, n=8).train_dataloader()))

    def forward_fn(module: HuggingFaceImageText, batch: dict) -> MultimodalOutput:
        out = module(batch)
        text = module.encoders["text"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return MultimodalOutput(out.logits, out.unimodal_logits, out.targets, {**out.features, "text": text})

    with pytest.raises(
        ValueError, match=r"D&R needs `MultimodalOutput.features\['text'\]` as a \(B, D\) tensor, got Base"
    ):
        collect_features(model, [batch], STYLE().modalities, forward_fn, "D&R")


@pytest.mark.ddp
@pytest.mark.parametrize("name", ["mmpareto", "relearning"])
def test_ddp_ranks_identical_and_equal_to_one_process(tmp_path, name):
    _fit(name, STYLE(), batch_size=4, extra=(SaveParams(tmp_path),), strategy="ddp_fork", devices=2)
    rank0, rank1 = load_ranks(tmp_path)
    assert_states_close(rank0, rank1, atol=0)
    assert_states_close(rank0, _fit(name, STYLE()), atol=1e-5)


def test_compiled_encoders_equal_eager():
    """MMPareto's and the monitor's second gradients, masked evaluation and probes, through compiled encoders."""
    compiled = STYLE()
    for modality in list(compiled.encoders):
        compiled.encoders[modality] = torch.compile(compiled.encoders[modality], backend="aot_eager")
    eager = _fit("monitor", STYLE(), extra=(MMPareto(),))
    assert_states_close(_fit("monitor", compiled, extra=(MMPareto(),)), eager, atol=1e-6)


@pytest.mark.ddp
@pytest.mark.parametrize("name", ["mmpareto", "monitor"])
def test_fsdp2_equals_one_process(tmp_path, name):
    extra = (AssertSharded(), SaveFullParams(tmp_path))
    _fit(name, ShardedHuggingFace(), batch_size=4, extra=extra, strategy=ForkModelParallel(), devices=2)
    rank0, rank1 = load_ranks(tmp_path)
    assert_states_close(rank0, rank1, atol=0)
    assert_states_close(rank0, _fit(name, STYLE()), atol=1e-5)
