"""Conformance matrix: every callback (and the meaningful pairs) on module styles unlike the reference model.

Each cell trains a few steps and checks that the parameters stay finite, that the callback logged its quantities, that
frozen parameters stay frozen, and the callback's own invariant: which gradients it may change (the others are
bit-identical before and after it), that the monitor leaves training bit-identical, that a re-initialisation moves
only encoders. Two-process DDP with Lightning's default flags runs on the separate-heads styles for every callback.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_mmbalance import DiagnosingRelearning, GradientBlending, ModalityMonitor
from tests.helpers.harness import CALLBACKS, PAIRS, Case, EpochStartSpy, GradSpy, Logged, logged_prefixes_present
from tests.helpers.styles import STYLES, StyleData, StyleModule, encoder_modules
from tests.helpers.tiny import SaveParams, assert_states_close, load_ranks, params_of, trainer_kwargs

CELLS = [(case, style) for case in CALLBACKS for style in STYLES]
PAIR_CELLS = [
    ("ogm_ge+arl", "dict-sum-convbn"),
    ("ogm_ge+arl", "three-modalities"),
    ("ogm_ge+gradient_blending", "attention-paths"),
    ("relearning+mmpareto", "dataclass-heads-transformer"),
    ("relearning+gradient_blending", "zeromask-frozen"),
    ("monitor+arl", "attention-paths"),
    ("monitor+agm", "three-modalities"),
    ("relearning+agm", "dict-sum-convbn"),
    ("opm+arl", "three-modalities"),
]


def _fit(case: Case, style: type[StyleModule], extra: list, datamodule_batch: int = 8, **overrides):
    model = style()
    callbacks = case.factory(style.encoder_paths)
    kw = trainer_kwargs(callbacks=[*extra[:1], *callbacks, *extra[1:]], max_epochs=case.epochs, limit_val_batches=1.0)
    kw.update(overrides)
    trainer = pl.Trainer(**kw)
    trainer.fit(model, datamodule=StyleData(style, n=32, batch_size=datamodule_batch))
    return trainer, model, callbacks


def _encoder_names(model: StyleModule) -> set[str]:
    ids = {id(p) for enc in encoder_modules(model).values() for p in enc.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _check_gradients(case: Case, model: StyleModule, before: GradSpy, after: GradSpy) -> None:
    encoder_names = _encoder_names(model)
    params = dict(model.named_parameters())
    assert len(before.steps) == len(after.steps) > 0
    changed = False
    for seen, result in zip(before.steps, after.steps, strict=True):
        for name, grad in seen.items():
            may_change = case.changes_gradients == "encoders" and name in encoder_names
            may_change |= case.changes_gradients == "selected" and name in encoder_names and params[name].ndim >= 2
            may_change |= case.changes_gradients == "all"
            if may_change:
                changed |= not torch.equal(grad, result[name])
            else:
                assert torch.equal(grad, result[name]), f"{name} was changed"
    assert changed == (case.changes_gradients != "none")


def _run_cell(case: Case, style: type[StyleModule]) -> None:
    before, after, logged = GradSpy(), GradSpy(), Logged()
    initial = {n: p.detach().clone() for n, p in style().named_parameters() if not p.requires_grad}
    _, model, callbacks = _fit(case, style, [before, after, logged])
    for name, value in model.state_dict().items():
        assert torch.isfinite(value).all(), name
    assert not logged_prefixes_present(logged.keys, case.tags), sorted(logged.keys)
    for name, value in initial.items():  # frozen parts stay as they were
        assert torch.equal(dict(model.named_parameters())[name], value), name
    _check_gradients(case, model, before, after)
    for cb in callbacks:
        if isinstance(cb, GradientBlending):
            assert sum(cb.weights.values()) == pytest.approx(1.0)
        if isinstance(cb, ModalityMonitor):
            assert any(k.startswith("mmbalance/monitor/masked_acc/") for k in logged.keys)
            assert any(k.startswith("mmbalance/monitor/shapley/") for k in logged.keys)


@pytest.mark.parametrize(("case", "style"), CELLS)
def test_callback_on_module_style(case, style):
    _run_cell(CALLBACKS[case], STYLES[style])


@pytest.mark.parametrize(("case", "style"), PAIR_CELLS)
def test_pair_on_module_style(case, style):
    _run_cell(PAIRS[case], STYLES[style])


@pytest.mark.parametrize("style", list(STYLES))
def test_monitor_leaves_every_style_bit_identical(style):
    case = CALLBACKS["monitor"]
    _, monitored, _ = _fit(case, STYLES[style], [])
    plain = STYLES[style]()
    pl.Trainer(**trainer_kwargs(max_epochs=case.epochs, limit_val_batches=1.0)).fit(
        plain, datamodule=StyleData(STYLES[style], n=32)
    )
    assert_states_close(monitored.state_dict(), plain.state_dict(), atol=0)


@pytest.mark.parametrize("style", ["dict-sum-convbn", "zeromask-frozen", "attention-paths"])
def test_relearning_moves_only_trainable_encoder_parameters(style):
    before, after = EpochStartSpy(), EpochStartSpy()
    cls = STYLES[style]
    _, model, (cb,) = _fit(CALLBACKS["relearning"], cls, [before, after])
    assert isinstance(cb, DiagnosingRelearning) and cb._n_reinits == 1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad} & _encoder_names(model)
    epoch = 2  # the diagnosis after epoch 1 runs at the start of epoch 2
    moved = [k for k in before.states[epoch] if not torch.equal(before.states[epoch][k], after.states[epoch][k])]
    assert moved and set(moved) <= trainable, moved


@pytest.mark.ddp
@pytest.mark.parametrize("case", list(CALLBACKS))
def test_ddp_default_flags_on_separate_heads(tmp_path, case):
    """``ddp_fork`` with Lightning's defaults (``find_unused_parameters=False``): no crash, identical ranks."""
    style = STYLES["dataclass-heads-transformer"]
    _fit(CALLBACKS[case], style, [SaveParams(tmp_path)], strategy="ddp_fork", devices=2)
    rank0, rank1 = load_ranks(tmp_path)
    assert_states_close(rank0, rank1, atol=0)
    assert params_of(style()).keys() == rank0.keys()


@pytest.mark.parametrize("case", list(CALLBACKS))
def test_accumulation_resume_and_bf16_on_a_user_style(tmp_path, case):
    """Dotted encoder paths, attention fusion with its own unimodal heads, dict batches (float32, no BatchNorm)."""
    style, spec = STYLES["attention-paths"], CALLBACKS[case]
    if spec.per_step and spec.accumulates:  # accumulation of 2 x 4 equals one batch of 8
        _, accumulated, _ = _fit(spec, style, [], accumulate_grad_batches=2, datamodule_batch=4)
        _, big, _ = _fit(spec, style, [], datamodule_batch=8)
        assert_states_close(accumulated.state_dict(), big.state_dict(), atol=1e-5)
    _, full, _ = _fit(spec, style, [], max_epochs=2 * spec.epochs)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _fit(spec, style, [checkpoint], enable_checkpointing=True, default_root_dir=tmp_path)
    resumed = style(seed=7)
    kw = trainer_kwargs(
        callbacks=spec.factory(style.encoder_paths),
        max_epochs=2 * spec.epochs,
        limit_val_batches=1.0,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
    )
    pl.Trainer(**kw).fit(resumed, datamodule=StyleData(style, n=32), ckpt_path=tmp_path / "last.ckpt")
    assert_states_close(resumed.state_dict(), full.state_dict(), atol=0)
    _, mixed, _ = _fit(spec, style, [], precision="bf16-mixed")
    assert all(torch.isfinite(v).all() for v in mixed.state_dict().values())
