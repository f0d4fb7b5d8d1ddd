"""Every callback on CUDA: 32-true, 16-mixed with a real GradScaler and bf16-mixed (skipped without a GPU)."""

from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision

from lightning_mmbalance import ARL, OGMGE, DiagnosingRelearning, GradientBlending, MMPareto, ModalityMonitor
from lightning_mmbalance.data import SyntheticDataModule
from lightning_mmbalance.models import LateFusionClassifier

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CALLBACKS: dict[str, Callable[[], Callback]] = {
    "ogm_ge": lambda: OGMGE(alpha=0.5),
    "ogm_ge_update": lambda: OGMGE(alpha=0.5, noise=False, modulate="update"),
    "mmpareto": lambda: MMPareto(),
    "arl": lambda: ARL(warmup_epochs=1),
    "gradient_blending": lambda: GradientBlending(super_epoch=1, estimation_epochs=1),
    "gradient_blending_joint": lambda: GradientBlending(super_epoch=1, estimator="joint"),
    "relearning": lambda: DiagnosingRelearning(every_n_epochs=1),
    "monitor": lambda: ModalityMonitor(conflict_every_n_steps=2, linear_probe=True),
}
TAGS = {
    "ogm_ge": "mmbalance/ogm_ge/",
    "ogm_ge_update": "mmbalance/ogm_ge/",
    "mmpareto": "mmbalance/mmpareto/",
    "arl": "mmbalance/arl/",
    "gradient_blending": "mmbalance/gradient_blending/",
    "gradient_blending_joint": "mmbalance/gradient_blending/",
    "relearning": "mmbalance/relearning/",
    "monitor": "mmbalance/monitor/",
}


class Logged(Callback):
    """Every key the callbacks logged during the fit."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        self.keys |= set(trainer.callback_metrics)

    def on_train_epoch_end(self, trainer: pl.Trainer, *args) -> None:
        self.keys |= set(trainer.callback_metrics)


def _fit(callbacks, accelerator="gpu", epochs=3, max_steps=-1, **kwargs):
    pl.seed_everything(0, verbose=False)
    dm = SyntheticDataModule(n_train=512, n_val=128, n_test=128, batch_size=64)
    model = LateFusionClassifier(dm.input_shapes, dm.num_classes)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=epochs,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        callbacks=callbacks,
        **kwargs,
    )
    trainer.fit(model, datamodule=dm)
    return trainer, model, initial


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("name", list(CALLBACKS))
def test_every_callback_trains_on_cuda(name, precision):
    logged = Logged()
    trainer, model, initial = _fit([CALLBACKS[name](), logged], precision=precision)
    assert trainer.strategy.root_device.type == "cuda"
    for key, value in model.state_dict().items():
        assert torch.isfinite(value).all(), key
    assert any(not torch.equal(initial[k], v.cpu()) for k, v in model.state_dict().items())
    assert any(k.startswith(TAGS[name]) for k in logged.keys), sorted(logged.keys)
    assert trainer.callback_metrics["val/acc"] > 0.5  # it learns (chance is 0.25)


@pytest.mark.parametrize("name", ["ogm_ge_deterministic", "mmpareto", "arl"])
def test_cuda_float32_matches_cpu(name):
    """The first steps on CUDA equal the CPU ones up to float32 rounding (later, ReLU flips make runs drift)."""
    factory = {
        "ogm_ge_deterministic": lambda: OGMGE(alpha=0.5, noise=False),
        "mmpareto": MMPareto,
        "arl": lambda: ARL(warmup_epochs=1),
    }[name]
    allow = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        _, gpu, _ = _fit([factory()], max_steps=12)  # ARL's warm-up epoch is 8 steps: 4 with its coefficients
        _, cpu, _ = _fit([factory()], accelerator="cpu", max_steps=12)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = allow
    for key, value in cpu.state_dict().items():
        torch.testing.assert_close(
            gpu.state_dict()[key].cpu(), value, atol=1e-5, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}"
        )


@pytest.mark.parametrize("name", ["ogm_ge", "mmpareto", "arl", "monitor"])
def test_fp16_overflow_steps_are_skipped(name):
    """A GradScaler starting at 2**24 overflows on the first steps: those are skipped, never NaN weights."""
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**24)
    _, model, initial = _fit([CALLBACKS[name]()], plugins=[MixedPrecision("16-mixed", "cuda", scaler)], epochs=2)
    assert scaler.get_scale() < 2.0**24  # overflow steps happened and were skipped
    for key, value in model.state_dict().items():
        assert torch.isfinite(value).all(), key
    assert any(not torch.equal(initial[k], v.cpu()) for k, v in model.state_dict().items())
