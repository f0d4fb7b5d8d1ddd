"""Every callback on CUDA: 32-true, 16-mixed with a real GradScaler and bf16-mixed (skipped without a GPU)."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from lightning_mmbalance import ARL, OGMGE, MMPareto
from lightning_mmbalance.data import SyntheticDataModule
from lightning_mmbalance.models import LateFusionClassifier
from tests.helpers.compiled import COMPILE_STYLES, ConvPool, compiled, plain_state
from tests.helpers.harness import CALLBACKS, Logged, logged_prefixes_present
from tests.helpers.styles import StyleData
from tests.helpers.tiny import trainer_kwargs
from tests.test_compile import SECOND_GRADIENT
from tests.test_ogm_ge import check_noise_seeds

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _fit(callbacks, accelerator="gpu", epochs=3, max_steps=-1, compile_encoders=False, **kwargs):
    pl.seed_everything(0, verbose=False)
    dm = SyntheticDataModule(n_train=512, n_val=128, n_test=128, batch_size=64)
    model = LateFusionClassifier(dm.input_shapes, dm.num_classes)
    if compile_encoders:
        for m in list(model.encoders):
            model.encoders[m] = torch.compile(model.encoders[m])
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kw = trainer_kwargs(accelerator=accelerator, max_epochs=epochs, max_steps=max_steps, callbacks=callbacks)
    trainer = pl.Trainer(**{**kw, "limit_val_batches": 1.0, "use_distributed_sampler": True, **kwargs})
    trainer.fit(model, datamodule=dm)
    return trainer, model, initial


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("name", list(CALLBACKS))
def test_every_callback_trains_on_cuda(name, precision):
    logged = Logged()
    trainer, model, initial = _fit([*CALLBACKS[name].factory(None), logged], precision=precision)
    assert trainer.strategy.root_device.type == "cuda"
    for key, value in model.state_dict().items():
        assert torch.isfinite(value).all(), key
    assert any(not torch.equal(initial[k], v.cpu()) for k, v in model.state_dict().items())
    assert not logged_prefixes_present(logged.keys, CALLBACKS[name].tags), sorted(logged.keys)
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


@pytest.mark.parametrize("name", ["ogm_ge", "mmpareto", "arl", "monitor", "agm"])
def test_fp16_overflow_steps_are_skipped(name):
    """A GradScaler starting at 2**24 overflows on the first steps: those are skipped, never NaN weights."""
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**24)
    callbacks = CALLBACKS[name].factory(None)
    _, model, initial = _fit(callbacks, plugins=[MixedPrecision("16-mixed", "cuda", scaler)], epochs=2)
    assert scaler.get_scale() < 2.0**24  # overflow steps happened and were skipped
    for key, value in model.state_dict().items():
        assert torch.isfinite(value).all(), key
    assert any(not torch.equal(initial[k], v.cpu()) for k, v in model.state_dict().items())


def test_ogm_ge_noise_seed_matters_on_cuda():
    """CUDA's generator uses every bit of the seed; the derived seed must also differ there (and repeat)."""
    check_noise_seeds(torch.device("cuda"))


@pytest.mark.parametrize("name", ["mmpareto", "monitor", "ogm_ge", "arl", "agm", "opm"])
def test_inductor_compiled_encoders_on_cuda(name):
    """Compiled with Inductor (the default backend) on the GPU: the same training as eager, up to float32 rounding."""
    allow = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        _, eager, _ = _fit(CALLBACKS[name].factory(None), max_steps=6)
        _, compiled, _ = _fit(CALLBACKS[name].factory(None), max_steps=6, compile_encoders=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = allow
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, atol=1e-4, rtol=1e-3)


def _fit_conv(callbacks, model, epochs=2):
    kw = trainer_kwargs(accelerator="gpu", max_epochs=epochs, callbacks=callbacks)
    pl.Trainer(**kw).fit(model, datamodule=StyleData(ConvPool, n=32))
    return {k: v.cpu() for k, v in plain_state(model).items()}


@pytest.mark.parametrize("style", COMPILE_STYLES)
@pytest.mark.parametrize("name", ["mmpareto", "arl_step_ratio", "monitor_conflict"])
def test_inductor_second_gradient_on_cuda(name, style):
    """Inductor on the GPU, the graphs compiled first by a plain fit (their backwards donate their activations): the
    callbacks' second gradients stay exact, the training equals eager up to float32 rounding (docs/compile.md)."""
    allow = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        eager = _fit_conv(SECOND_GRADIENT[name](), ConvPool())
        _fit_conv([], compiled(ConvPool(), style), epochs=1)
        state = _fit_conv(SECOND_GRADIENT[name](), compiled(ConvPool(), style))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = allow
    for key, value in eager.items():
        torch.testing.assert_close(state[key], value, atol=1e-5, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
