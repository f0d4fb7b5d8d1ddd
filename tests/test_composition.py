"""Several callbacks on one Trainer: what is refused, and what composes independently of the callbacks' order."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_mmbalance import (
    AGM,
    ARL,
    OGMGE,
    OPM,
    DiagnosingRelearning,
    GradientBlending,
    InfoReg,
    MMPareto,
    ModalityMonitor,
)
from lightning_mmbalance.callbacks import UnimodalLosses
from tests.helpers.harness import GradSpy
from tests.helpers.tiny import TinyModel, assert_states_close, fit, params_of


@pytest.mark.parametrize(
    ("callbacks", "match"),
    [
        (lambda: [MMPareto(), OGMGE()], r"MMPareto replaces each encoder's gradient, and \['OGMGE'\] also change"),
        (lambda: [OGMGE(), MMPareto()], r"MMPareto replaces .* \['OGMGE'\] also .* table in docs/composition\.md"),
        (lambda: [ARL(), MMPareto()], r"\['ARL', 'MMPareto'\] all set the loss weights"),
        (lambda: [GradientBlending(), UnimodalLosses()], r"\['GradientBlending', 'UnimodalLosses'\] all set the loss"),
        (lambda: [OGMGE(alpha=0.1), OGMGE(alpha=0.2)], "more than one OGMGE callback"),
        (lambda: [AGM(), OGMGE()], r"AGM replaces each encoder's gradient, and \['OGMGE'\] also change"),
        (lambda: [ARL(), AGM()], r"AGM replaces each encoder's gradient, and \['ARL'\] also change"),
        (lambda: [UnimodalLosses(), AGM()], r"AGM's rule is defined for the fused loss, and \['UnimodalLosses'\] set"),
        (lambda: [AGM(), GradientBlending()], r"and \['GradientBlending'\] set the loss weights"),
        (lambda: [DiagnosingRelearning(), DiagnosingRelearning(strength=1)], "more than one DiagnosingRelearning"),
        (lambda: [InfoReg(), OGMGE()], r"InfoReg adds a term to each encoder's gradient, and \['OGMGE'\] also change"),
        (lambda: [OGMGE(), InfoReg()], r"InfoReg adds a term to each encoder's gradient, and \['OGMGE'\] also change"),
        (lambda: [InfoReg(unimodal_loss_weight=0.0), MMPareto()], r"InfoReg adds a term .* and \['MMPareto'\] also"),
        (lambda: [InfoReg(unimodal_loss_weight=0.0), ARL()], r"InfoReg adds a term .* and \['ARL'\] also change"),
        (lambda: [ARL(), InfoReg()], r"\['ARL', 'InfoReg'\] all set the loss weights"),
        (lambda: [InfoReg(), GradientBlending()], r"\['InfoReg', 'GradientBlending'\] all set the loss weights"),
        (lambda: [OPM(), OGMGE()], "OPM and OGMGE on one Trainer are not supported: the journal code's OGM reads"),
        (lambda: [OGMGE(), OPM()], "OPM and OGMGE on one Trainer are not supported"),
        (lambda: [OPM(), OPM(q_base=0.2)], "more than one OPM callback"),
    ],
)
def test_order_dependent_combinations_are_refused(callbacks, match):
    with pytest.raises(MisconfigurationException, match=match):
        fit(callbacks(), max_steps=1)


def test_two_monitors_are_fine():
    fit([ModalityMonitor(masked_eval=False, shapley=False), ModalityMonitor(every_n_steps=2)], max_steps=2)


@pytest.mark.parametrize(("modulate", "noise"), [("gradient", False), ("update", False), ("gradient", True)])
def test_gradient_scalers_compose_in_any_order(modulate, noise):
    """OGMGE and ARL both multiply encoder gradients by per-modality factors: the product, in either order.

    OGM-GE's noise scale is the gradient's std + 1e-8, so after ARL's factor it is (1 + a) std + 1e-8 rather than
    (1 + a) (std + 1e-8): with noise the two orders agree up to that floor, which 16 noisy steps amplify to 0.4-1.5e-6
    (seeds 0-3) on weights of norm 5-16.
    """

    def run(order):
        make = {
            "ogm": lambda: OGMGE(alpha=0.5, noise=noise, modulate=modulate),
            "arl": lambda: ARL(warmup_epochs=0, modulate=modulate),
        }
        return fit([make[name]() for name in order], model=TinyModel(momentum=0.9), max_epochs=2)[1]

    first, second = run(["ogm", "arl"]), run(["arl", "ogm"])
    assert_states_close(first.state_dict(), second.state_dict(), atol=5e-6 if noise else 1e-12)
    alone = run(["arl"])
    assert not torch.allclose(first.encoders["a"][0].weight, alone.encoders["a"][0].weight)


def test_scaler_product_on_one_step():
    """With OGM-GE's noise off, the encoder gradient is (1 + a_m) * k_m times the plain one."""
    before, after = GradSpy(), GradSpy()
    trainer, _ = fit([before, OGMGE(alpha=0.5, noise=False), ARL(warmup_epochs=0), after], max_steps=1)
    metrics = trainer.callback_metrics
    for m in ("a", "b"):
        k = float(metrics[f"mmbalance/ogm_ge/coefficient/{m}"])
        a = float(metrics[f"mmbalance/arl/coefficient/{m}"])
        for name, grad in before.steps[0].items():
            expected = grad * (1 + a) * k if name.startswith(f"encoders.{m}.") and grad.ndim >= 2 else None
            if name.startswith(f"encoders.{m}.") and grad.ndim < 2:
                expected = grad * (1 + a)  # OGM-GE's "weights" filter leaves biases to ARL alone
            if expected is not None:
                torch.testing.assert_close(after.steps[0][name], expected, rtol=1e-6, atol=1e-12)


class RecordWeights(Callback):
    def __init__(self, blend: GradientBlending) -> None:
        self.blend, self.weights = blend, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.weights.append(self.blend.weights)


def test_relearning_then_estimation_whatever_the_order():
    """Gradient Blending estimates after DiagnosingRelearning's re-initialisation of the same epoch, in any order."""

    def run(blend_first: bool):
        blend = GradientBlending(super_epoch=1, estimator="joint")
        relearn = DiagnosingRelearning(every_n_epochs=1, max_reinits=2, strength=10.0)
        record = RecordWeights(blend)
        callbacks = [blend, relearn] if blend_first else [relearn, blend]
        _, model = fit([*callbacks, record], max_epochs=4, limit_val_batches=1.0)
        assert relearn._n_reinits == 2
        return params_of(model), record.weights

    (params_a, weights_a), (params_b, weights_b) = run(True), run(False)
    assert weights_a == weights_b and len(set(map(str, weights_a))) > 2
    assert_states_close(params_a, params_b, atol=0)


def test_monitor_reports_the_applied_gradient_in_any_order():
    """The monitor's grad_norm is the norm of the encoder gradient the optimizer applied, wherever it sits."""

    def run(monitor_first: bool):
        monitor = ModalityMonitor(masked_eval=False, shapley=False)
        after = GradSpy()
        callbacks = [monitor, ARL(warmup_epochs=0)] if monitor_first else [ARL(warmup_epochs=0), monitor]
        trainer, _ = fit([*callbacks, after], max_steps=1)
        return trainer.callback_metrics, after.steps[0]

    (first, grads), (second, _) = run(True), run(False)
    for m in ("a", "b"):
        tag = f"mmbalance/monitor/grad_norm/{m}"
        assert float(first[tag]) == pytest.approx(float(second[tag]), rel=1e-6)
        applied = torch.stack([g.norm() for n, g in grads.items() if n.startswith(f"encoders.{m}.")]).norm()
        assert float(first[tag]) == pytest.approx(float(applied), rel=1e-6)


@pytest.mark.parametrize("other", ["arl", "mmpareto", "monitor"])
def test_feature_drop_composes_with_gradient_methods_in_any_order(other):
    """OPM changes the forward, the others the loss or the gradients: the callbacks' order does not matter.

    The other method's statistics come from the dropped forward, so the result differs from the method alone.
    """
    make = {
        "arl": lambda: ARL(warmup_epochs=0),
        "mmpareto": MMPareto,
        "monitor": lambda: ModalityMonitor(conflict_every_n_steps=2, masked_eval=False, shapley=False),
    }[other]

    def run(callbacks):
        return params_of(fit(callbacks, model=TinyModel(momentum=0.9), max_steps=6)[1])

    first = run([OPM(modulation_starts=0, p_exe=1.0), make()])
    assert_states_close(first, run([make(), OPM(modulation_starts=0, p_exe=1.0)]), atol=0)
    alone = run([make()])
    assert not torch.equal(first["encoders.a.0.weight"], alone["encoders.a.0.weight"])
