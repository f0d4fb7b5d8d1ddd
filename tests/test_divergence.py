"""Divergence is never silent: non-finite statistics, gradients or weights are reported at the step they appear."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_mmbalance import (
    ARL,
    OGMGE,
    DiagnosingRelearning,
    DivergenceError,
    DivergenceWarning,
    GradientBlending,
    MMPareto,
    ModalityMonitor,
)
from tests.helpers.harness import CALLBACKS
from tests.helpers.tiny import TinyData, TinyModel, fit

NAMES = list(CALLBACKS)
EPOCH_STEPS = 3


class DivergingModel(TinyModel):
    """Encoder ``b`` is trained at an infinite learning rate: its weights are NaN or infinite after the first step."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        diverging = list(self.encoders["b"].parameters())
        others = [p for p in self.parameters() if all(p is not q for q in diverging)]
        groups = [{"params": others}, {"params": diverging, "lr": math.inf}]
        return torch.optim.SGD(groups, lr=self.lr)


class FirstNonFinite(pl.Callback):
    """The first optimizer step whose encoder weights (before the step) are not all finite."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        finite = all(bool(p.isfinite().all()) for p in pl_module.encoders.parameters())
        if self.step is None and not finite:
            self.step = trainer.global_step


class Corrupt(pl.Callback):
    """Writes NaN into encoder ``b``'s weights at the start of epoch ``epoch`` (place it before the callback)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                for p in pl_module.encoders["b"].parameters():
                    p.fill_(math.nan)


def _fit_case(name: str, extra: list, **overrides):
    case = CALLBACKS[name]
    callbacks = case.factory(None)
    kw = {"max_epochs": case.epochs, "limit_val_batches": 1.0 if case.needs_val else 0, **overrides}
    kw.update(limit_train_batches=EPOCH_STEPS)
    return callbacks, lambda: fit([*extra, *callbacks], model=DivergingModel(momentum=0.9), **kw)


def _first_step_seeing_it(message: str) -> int:
    """The step whose forward first sees the non-finite weights: "at step s" is s, "after step s" is s + 1."""
    found = re.search(r"(at|after) step (\d+)", message)
    assert found is not None, message
    return int(found.group(2)) + (found.group(1) == "after")


@pytest.mark.parametrize("name", NAMES)
def test_a_diverging_run_is_reported_at_that_step(name):
    """Encoder 'b' diverges at the first step: every callback names itself, 'b', the step, step_ratio and the remedy."""
    case = CALLBACKS[name]
    spy = FirstNonFinite()
    overrides = {"max_epochs": 1} if case.divergence == "warning" else {}
    callbacks, run = _fit_case(name, [spy], **overrides)
    cls = type(callbacks[0]).__name__
    pattern = (
        rf"^{cls}: .+ for modalit(y|ies) [^:]*'b'[^:]* became non-finite \(NaN or inf\) .*step \d+.*: training has "
        r"diverged\. .*step_ratio.*\. Lower the learning rate .*`Trainer\(gradient_clip_val=\.\.\.\)`"
    )
    if case.divergence == "warning":
        with pytest.warns(DivergenceWarning, match=pattern) as record:
            trainer, _ = run()
        messages = [str(w.message) for w in record if issubclass(w.category, DivergenceWarning)]
        assert len(messages) == 1  # once, and the fit goes on to its end
        assert trainer.current_epoch == 1
        message = messages[0]
    else:
        with pytest.raises(DivergenceError, match=pattern) as info:
            run()
        message = str(info.value)
    assert spy.step is not None
    if case.divergence == "epoch":
        assert "at the end of epoch 0 " in message
        assert _first_step_seeing_it(message) == EPOCH_STEPS
    else:
        assert _first_step_seeing_it(message) == spy.step
    if getattr(callbacks[0], "reports_step_ratio", False):  # measured at every step here (log_every_n_steps=1)
        assert f"Last step_ratio (step {spy.step - 1}): 'a' " in message
    else:
        assert f"step_ratio: not measured by {cls}" in message


class NaNGradient(TinyModel):
    """The forward stays finite, but the first weight of encoder ``b`` gets a NaN gradient (in every backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoders["b"][0].weight.register_hook(lambda grad: torch.full_like(grad, math.nan))


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda: OGMGE(noise=False), "the norms of its encoder gradients"),
        (lambda: ARL(warmup_epochs=0), r"the norms of its encoder gradients \(with and without the unimodal losses\)"),
        (MMPareto, "the dot products of its fused-loss and unimodal-loss gradients"),
    ],
)
def test_non_finite_gradients_are_reported_at_that_step(make, what):
    """Finite statistics, NaN gradients: the gradient norms or products the callback reads report it before the step."""
    callback = make()
    pattern = rf"^{type(callback).__name__}: {what} for modality 'b' became non-finite \(NaN or inf\) at step 0 "
    with pytest.raises(DivergenceError, match=pattern):
        fit([callback], model=NaNGradient())


def test_the_monitor_warns_about_its_conflict_test():
    pattern = r"^ModalityMonitor: the dot products of its conflict test's gradients for modality 'b' .* at step 0 "
    with pytest.warns(DivergenceWarning, match=pattern):
        fit([ModalityMonitor(conflict_every_n_steps=1, masked_eval=False, shapley=False)], model=NaNGradient())


def test_a_healthy_run_reports_nothing():
    """Every shared invariant test is a healthy run that a DivergenceError would fail; the monitor only warns, so its
    healthy run is checked here with the warning turned into an error."""
    case = CALLBACKS["monitor"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        trainer, _ = fit(case.factory(None), max_epochs=1, limit_val_batches=1.0)
    assert trainer.global_step == len(TinyData().train_dataloader())


@pytest.mark.parametrize("estimator", ["copies", "joint"])
def test_gradient_blending_reports_non_finite_estimation_losses(estimator):
    blend = GradientBlending(super_epoch=1, estimation_epochs=1, max_batches=2, estimator=estimator)
    pattern = (
        r"^GradientBlending: the .*losses of its estimation round.* for modality 'b', 'fused' became non-finite "
        r"\(NaN or inf\) in the estimation round at the start of epoch 0 \(before step 0\)"
    )
    with pytest.raises(DivergenceError, match=pattern):
        fit([Corrupt(epoch=0), blend], max_epochs=1, limit_val_batches=1.0)


def test_relearning_reports_non_finite_features_before_clustering():
    """Instead of scikit-learn's "Input contains NaN" from inside k-means."""
    relearn = DiagnosingRelearning(every_n_epochs=1, strength=1.0)
    steps = 2 * len(TinyData().train_dataloader())  # two epochs trained before the diagnosis at the start of epoch 2
    pattern = (
        r"^DiagnosingRelearning: the encoder features it clusters for modality 'b' became non-finite \(NaN or inf\) "
        rf"in the diagnosis after epoch 1 \(before step {steps}\)"
    )
    with pytest.raises(DivergenceError, match=pattern):
        fit([Corrupt(epoch=2), relearn], max_epochs=3, limit_val_batches=1.0)


def test_step_ratio_not_measured_yet():
    """Divergence before the first logged step: the message says step_ratio was not measured yet."""
    with pytest.raises(DivergenceError, match=r"at step 1 .* step_ratio: not measured yet"):
        fit([ARL(warmup_epochs=0)], model=DivergingModel(), log_every_n_steps=50)


class InfiniteSample(TinyData):
    """Sample 1, the first of rank 1 under 2-rank DDP, has an infinite input: only rank 1's statistics are NaN."""

    def __init__(self) -> None:
        super().__init__(batch_size=4)
        self.train_set.inputs["b"][1] = math.inf


class RecordingARL(ARL):
    """Records its first divergence report in ``<folder>/rank<r>.txt`` instead of raising, to compare the ranks."""

    def __init__(self, folder: Path) -> None:
        super().__init__(warmup_epochs=0)
        self.folder = folder

    def report_divergence(self, trainer: pl.Trainer, what: str, keys, when=None) -> None:
        path = self.folder / f"rank{trainer.global_rank}.txt"
        try:
            super().report_divergence(trainer, what, keys, when)
        except DivergenceError as err:
            if not path.exists():
                path.write_text(str(err))


@pytest.mark.ddp
def test_ddp_ranks_decide_together(tmp_path):
    """A non-finite value on one rank only: both ranks report it at the same step (reduced statistics), so they raise
    together and none waits for the other in a collective."""
    fit([RecordingARL(tmp_path)], data=InfiniteSample(), max_steps=2, strategy="ddp_fork", devices=2)
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in range(2))
    assert rank0 == rank1
    assert re.match(r"RecordingARL: its step statistics \(abs_logit, entropy\) for modality 'b' .* at step 0 ", rank0)
