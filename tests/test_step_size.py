"""Step-size transparency: what each scaling method does to the encoders' step, and the warning when one diverges."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_mmbalance import ARL, OGMGE, MMPareto
from lightning_mmbalance.callbacks.base import StepSizeWarning
from lightning_mmbalance.data import SyntheticDataModule
from lightning_mmbalance.models import LateFusionClassifier
from tests.helpers.harness import GradSpy
from tests.helpers.tiny import TinyData, TinyModel, fit


def _first_batch():
    return next(iter(TinyData().train_dataloader()))


def _encoder_norm(grads: dict[str, torch.Tensor], modality: str) -> float:
    return float(torch.stack([g.norm() for n, g in grads.items() if n.startswith(f"encoders.{modality}.")]).norm())


def _plain_gradient_norms(weights: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Per encoder: the norm of grad L_f and of grad (w_f L_f + sum w_m L_m) on the first batch of TinyData."""
    model = TinyModel()
    out = model(_first_batch())
    ce = nn.functional.cross_entropy
    fused = ce(out.logits, out.targets)
    total = weights["fused"] * fused + sum(weights[m] * ce(out.unimodal_logits[m], out.targets) for m in "ab")
    result = []
    for loss in (fused, total):
        norms = {}
        for m in "ab":
            grads = torch.autograd.grad(loss, list(model.encoders[m].parameters()), retain_graph=True)
            norms[m] = float(torch.stack([g.norm() for g in grads]).norm())
        result.append(norms)
    return result[0], result[1]


def test_mmpareto_step_ratio_is_final_over_fused_gradient():
    after = GradSpy()
    trainer, _ = fit([MMPareto(), after], max_steps=1)
    plain, _ = _plain_gradient_norms({"fused": 1.0, "a": 1.0, "b": 1.0})
    for m in "ab":
        expected = _encoder_norm(after.steps[0], m) / plain[m]
        assert float(trainer.callback_metrics[f"mmbalance/mmpareto/step_ratio/{m}"]) == pytest.approx(expected, 1e-6)


@pytest.mark.parametrize("modulate", ["gradient", "update"])
def test_arl_step_ratio_counts_the_unimodal_losses_and_the_factor(modulate):
    trainer, _ = fit([ARL(warmup_epochs=0, gamma=4.0, modulate=modulate)], max_steps=1)
    plain, total = _plain_gradient_norms({"fused": 1.0, "a": 4.0, "b": 4.0})
    for m in "ab":
        a = float(trainer.callback_metrics[f"mmbalance/arl/coefficient/{m}"])
        ratio = float(trainer.callback_metrics[f"mmbalance/arl/step_ratio/{m}"])
        assert ratio == pytest.approx((1 + a) * total[m] / plain[m], rel=1e-5)
        assert ratio > 1


@pytest.mark.parametrize(("modulate", "noise"), [("gradient", True), ("gradient", False), ("update", False)])
def test_ogm_ge_step_ratio(modulate, noise):
    before, after = GradSpy(), GradSpy()
    trainer, _ = fit([before, OGMGE(alpha=0.5, noise=noise, modulate=modulate), after], max_steps=1)
    for m in "ab":
        k = float(trainer.callback_metrics[f"mmbalance/ogm_ge/coefficient/{m}"])
        ratio = float(trainer.callback_metrics[f"mmbalance/ogm_ge/step_ratio/{m}"])
        if modulate == "gradient":
            expected = _encoder_norm(after.steps[0], m) / _encoder_norm(before.steps[0], m)
        else:  # the weights ("weights" filter) have their update scaled by k, the biases keep theirs
            grads = before.steps[0]
            selected = sum(
                float(g.norm()) ** 2 for n, g in grads.items() if n.startswith(f"encoders.{m}.") and g.ndim > 1
            )
            others = sum(
                float(g.norm()) ** 2 for n, g in grads.items() if n.startswith(f"encoders.{m}.") and g.ndim < 2
            )
            expected = ((k**2 * selected + others) / (selected + others)) ** 0.5
        assert ratio == pytest.approx(expected, rel=1e-6)
    assert min(float(trainer.callback_metrics[f"mmbalance/ogm_ge/step_ratio/{m}"]) for m in "ab") < 1 or noise


@pytest.mark.parametrize("make", [lambda: ARL(warmup_epochs=0), MMPareto])
def test_warning_on_a_diverging_encoder(make):
    """At lr 0.5 with momentum the amplified steps make the encoders' weights run away: one warning per encoder."""
    with pytest.warns(StepSizeWarning) as record:
        fit([make()], model=TinyModel(lr=0.5, momentum=0.9), max_epochs=3, log_every_n_steps=1)
    messages = [str(w.message) for w in record if issubclass(w.category, StepSizeWarning)]
    name = type(make()).__name__
    assert len(messages) == len(set(messages)) <= 2
    assert all(m.startswith(f"{name}: the weight norm of the ") for m in messages)
    assert any("'a' encoder grew" in m for m in messages)
    assert all("Lower the learning rate" in m for m in messages)


@pytest.mark.parametrize("make", [lambda: ARL(warmup_epochs=1), MMPareto, lambda: OGMGE(alpha=0.5)])
def test_no_warning_on_a_healthy_run(make):
    """The reference model at its default learning rate on the built-in synthetic data: silent."""
    dm = SyntheticDataModule(n_train=512, n_val=64, n_test=64)
    model = LateFusionClassifier(dm.input_shapes, dm.num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StepSizeWarning)
        trainer, _ = fit([make()], model=model, data=dm, max_epochs=4, log_every_n_steps=1)
    assert any(key.endswith("step_ratio/m1") for key in trainer.callback_metrics)


@pytest.mark.parametrize(("lr", "diverges"), [(0.1, True), (0.01, False)])
def test_arl_on_cg_digits_warns_only_when_the_learning_rate_is_too_large(lr, diverges):
    """CG-Digits, ARL at its defaults: at lr 0.1 (the joint-loss baseline's best rate) its encoders die early and the
    warning comes within three epochs; at ARL's own validation-selected rate (0.01) it stays silent."""
    from lightning_mmbalance.data import CGDigitsDataModule

    torch.manual_seed(0)
    dm = CGDigitsDataModule()
    model = LateFusionClassifier(dm.input_shapes, dm.num_classes, lr=lr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit([ARL(warmup_epochs=1)], model=model, data=dm, max_epochs=3, log_every_n_steps=5)
    messages = [str(w.message) for w in caught if issubclass(w.category, StepSizeWarning)]
    assert bool(messages) == diverges, messages
    assert all(m.startswith("ARL: the weight norm of the ") and "no better than chance" in m for m in messages)
