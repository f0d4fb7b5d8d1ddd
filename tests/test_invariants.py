"""The invariants every callback keeps, run for each entry of ``tests.helpers.harness.CALLBACKS``.

Gradient accumulation equals one big batch, 2 DDP ranks equal one process with twice the batch (the ranks always end
identical), a resumed fit equals an uninterrupted one bit for bit, mixed precision stays finite and steps a GradScaler
skips are skipped by the callbacks too, Adam-type optimizers get a warning where scaling gradients means little,
every bad argument gets its message, and checkpointed state round-trips (older state versions included).
"""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision

from lightning_mmbalance import AGM, ARL, OGMGE, OPM, GradientBlending, InfoReg, MMPareto, ModalityMonitor
from tests.helpers.harness import CALLBACKS, Logged, logged_prefixes_present
from tests.helpers.tiny import (
    SaveParams,
    TinyData,
    TinyModel,
    assert_states_close,
    fit,
    load_ranks,
    params_of,
    trainer_kwargs,
)

NAMES = list(CALLBACKS)


def _fit_case(name: str, model=None, data=None, extra=(), **overrides):
    case = CALLBACKS[name]
    callbacks = [*case.factory(None), *extra]
    kw = {"max_epochs": case.epochs, "limit_val_batches": 1.0 if case.needs_val else 0, **overrides}
    trainer, model = fit(callbacks, model=model if model is not None else TinyModel(momentum=0.9), data=data, **kw)
    return trainer, model, callbacks


class Float32(TinyModel):
    def __init__(self, **kw):
        super().__init__(momentum=0.9, **kw)
        self.float()

    def forward(self, batch):
        inputs, y = batch
        return super().forward(({m: x.float() for m, x in inputs.items()}, y))


@pytest.mark.parametrize("name", [n for n in NAMES if CALLBACKS[n].per_step and CALLBACKS[n].accumulates])
def test_accumulation_equals_big_batch(name):
    _, accumulated, _ = _fit_case(name, data=TinyData(batch_size=4), accumulate_grad_batches=2)
    _, big, _ = _fit_case(name, data=TinyData(batch_size=8))
    assert_states_close(accumulated.state_dict(), big.state_dict(), atol=1e-10)


@pytest.mark.ddp
@pytest.mark.parametrize("name", NAMES)
def test_ddp_ranks_identical_and_equal_to_one_process(tmp_path, name):
    case = CALLBACKS[name]
    _fit_case(name, data=TinyData(batch_size=4), extra=[SaveParams(tmp_path)], strategy="ddp_fork", devices=2)
    rank0, rank1 = load_ranks(tmp_path)
    assert_states_close(rank0, rank1, atol=0)
    if case.per_step and case.deterministic_ddp:
        _, single, _ = _fit_case(name, data=TinyData(batch_size=8))
        assert_states_close(rank0, single.state_dict(), atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_exact(tmp_path, name):
    case = CALLBACKS[name]
    epochs = 2 * case.epochs
    _, full, full_callbacks = _fit_case(name, max_epochs=epochs)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _fit_case(name, extra=[checkpoint], max_epochs=case.epochs, enable_checkpointing=True, default_root_dir=tmp_path)
    resumed = TinyModel(momentum=0.9, seed=123)  # another initialisation: everything must come from the checkpoint
    callbacks = case.factory(None)
    kw = trainer_kwargs(
        callbacks=list(callbacks),
        max_epochs=epochs,
        limit_val_batches=1.0 if case.needs_val else 0,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
    )
    pl.Trainer(**kw).fit(resumed, datamodule=TinyData(), ckpt_path=tmp_path / "last.ckpt")
    assert_states_close(resumed.state_dict(), full.state_dict(), atol=0)
    for mine, theirs in zip(callbacks, full_callbacks, strict=True):
        assert mine.state_dict().keys() == theirs.state_dict().keys()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed-scaler"])
@pytest.mark.parametrize("name", NAMES)
def test_mixed_precision_stays_finite_and_logs(name, precision):
    logged = Logged()
    kw = (
        {"precision": precision}
        if precision == "bf16-mixed"
        else {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**12))]}
    )
    _, model, _ = _fit_case(name, model=Float32(), extra=[logged], **kw)
    for key, value in model.state_dict().items():
        assert torch.isfinite(value).all(), key
    assert not logged_prefixes_present(logged.keys, CALLBACKS[name].tags), sorted(logged.keys)


@pytest.mark.parametrize("name", NAMES)
def test_steps_the_grad_scaler_skips_are_skipped(name):
    """A GradScaler starting at 2**28 overflows on the first steps: the callbacks skip exactly those steps."""
    case = CALLBACKS[name]
    callbacks = case.factory(None)
    calls = []
    for cb in callbacks:
        original = cb.on_step
        cb.on_step = lambda *args, original=original: calls.append(1) or original(*args)  # type: ignore[method-assign]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**28)
    kw = {"max_epochs": max(case.epochs, 3), "limit_val_batches": 1.0 if case.needs_val else 0}
    trainer, model = fit(callbacks, model=Float32(), plugins=[MixedPrecision("16-mixed", "cpu", scaler)], **kw)
    skipped = 28 - int(math.log2(scaler.get_scale()))
    assert 0 < skipped < trainer.global_step
    assert len(calls) == (trainer.global_step - skipped) * len(callbacks)
    for key, value in model.state_dict().items():
        assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("name", NAMES)
def test_adaptive_optimizer_warning_only_where_scaling_is_undone(name):
    model = TinyModel(optimizer="adam", lr=0.01)
    if CALLBACKS[name].scales:
        with pytest.warns(UserWarning, match=r"scales gradients, but Adam normalises.*modulate='update'"):
            _fit_case(name, model=model, max_steps=1)
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _fit_case(name, model=model, max_steps=1)
        assert not [w for w in caught if "scales gradients" in str(w.message)]


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "match"),
    [(name, *entry) for name, case in CALLBACKS.items() for entry in case.errors],
)
def test_argument_errors(name, kwargs, error, match):
    factory = {
        "agm": AGM,
        "ogm_ge": OGMGE,
        "mmpareto": MMPareto,
        "arl": ARL,
        "gradient_blending": GradientBlending,
        "relearning": __import__("lightning_mmbalance").DiagnosingRelearning,
        "monitor": ModalityMonitor,
        "inforeg": InfoReg,
        "opm": OPM,
    }[name]
    with pytest.raises(error, match=match):
        factory(**kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip_and_version_check(name):
    _, _, callbacks = _fit_case(name, max_steps=3)
    for cb in callbacks:
        fresh = type(cb)()
        fresh.load_state_dict(cb.state_dict())
        assert fresh.state_dict().keys() == cb.state_dict().keys()
        with pytest.raises(ValueError, match=rf"{type(cb).__name__}: unsupported checkpoint state version 99"):
            fresh.load_state_dict({**cb.state_dict(), "version": 99})


@pytest.mark.parametrize(("name", "kwargs"), [("ogm_ge", {"noise": False}), ("arl", {}), ("mmpareto", {})])
def test_update_mode_equals_gradient_mode_for_plain_sgd(name, kwargs):
    """For SGD without momentum or weight decay, scaling the update is scaling the gradient."""
    cls = {"ogm_ge": OGMGE, "arl": lambda **kw: ARL(warmup_epochs=1, **kw), "mmpareto": MMPareto}[name]
    _, gradient_mode = fit([cls(**kwargs)], max_epochs=2)
    _, update_mode = fit([cls(modulate="update", **kwargs)], max_epochs=2)
    assert_states_close(params_of(gradient_mode), params_of(update_mode), atol=1e-12)
