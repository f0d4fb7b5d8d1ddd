"""``torch.compile``: every callback with compiled encoders and with a compiled module equals the eager run.

Every callback is compiled with the ``aot_eager`` backend (Dynamo and AOTAutograd, where compiled backwards donate
their saved buffers) in the three ways users compile, and with Inductor, the default backend, with compiled encoders
on the smallest module whose Inductor backward reused a saved activation in place (``docs/compile.md``): its graphs
compile once and are reused, so every callback costs about a second. The callbacks that take a second gradient of the
step's forward (MMPareto every step, ARL's ``step_ratio`` on logging steps, the monitor's conflict test) are also
compiled with Inductor as a whole module, both ways.
``tests/test_cuda.py`` compiles with Inductor on a GPU.
"""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch._dynamo.utils import counters

from lightning_mmbalance import ARL, MMPareto, ModalityMonitor
from lightning_mmbalance.utilities.compile import allow_retained_graphs, release_retained_graphs
from tests.helpers.compiled import ConvPool, compiled, plain_state
from tests.helpers.harness import CALLBACKS, Logged, logged_prefixes_present
from tests.helpers.styles import STYLES, StyleData
from tests.helpers.tiny import trainer_kwargs

STYLE = STYLES["tuple-concat-mlp"]


def _run(case_name: str, compile_mode: str | None):
    case = CALLBACKS[case_name]
    model = STYLE()
    if compile_mode == "encoders":
        for m in list(model.encoders):
            model.encoders[m] = torch.compile(model.encoders[m], backend="aot_eager")
    elif compile_mode == "module":
        model.compile(backend="aot_eager")
    elif compile_mode == "wrapped":
        model = torch.compile(model, backend="aot_eager")
    logged = Logged()
    kw = trainer_kwargs(callbacks=[*case.factory(STYLE.encoder_paths), logged], max_epochs=case.epochs)
    pl.Trainer(**{**kw, "limit_val_batches": 1.0}).fit(model, datamodule=StyleData(STYLE, n=32))
    assert not logged_prefixes_present(logged.keys, case.tags), sorted(logged.keys)
    state = (model._orig_mod if compile_mode == "wrapped" else model).state_dict()
    return {k.replace("._orig_mod", ""): v for k, v in state.items()}


@pytest.mark.parametrize("compile_mode", ["encoders", "module"])
@pytest.mark.parametrize("case", list(CALLBACKS))
def test_compiled_equals_eager(case, compile_mode):
    eager = _run(case, None)
    compiled = _run(case, compile_mode)
    assert compiled.keys() == eager.keys()
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, atol=1e-5, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("case", list(CALLBACKS))
def test_compiled_lightning_module_equals_eager(case):
    """``trainer.fit(torch.compile(model))``, which Lightning unwraps and compiles again."""
    eager = _run(case, None)
    compiled = _run(case, "wrapped")
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, atol=1e-5, rtol=1e-5)


def _monitor_conflict():
    return ModalityMonitor(conflict_every_n_steps=1, masked_eval=False, shapley=False)


SECOND_GRADIENT = {
    "mmpareto": lambda: [MMPareto()],
    "arl_step_ratio": lambda: [ARL(warmup_epochs=0)],  # step_ratio on every step: log_every_n_steps=1
    "monitor_conflict": lambda: [_monitor_conflict()],
    "mmpareto+monitor_conflict": lambda: [MMPareto(), _monitor_conflict()],
    "arl_step_ratio+monitor_conflict": lambda: [ARL(warmup_epochs=0), _monitor_conflict()],
}
"""The callbacks that take a second gradient of the step's forward, each on every step."""

INDUCTOR_RUNS = [
    ("encoders", "mmpareto"),
    ("encoders", "arl_step_ratio"),
    ("encoders", "monitor_conflict"),
    ("module", "mmpareto+monitor_conflict"),
    ("wrapped", "arl_step_ratio+monitor_conflict"),
]
"""Each callback in two of the three compile styles: every run compiles (Inductor takes seconds on CPU)."""


def _fit_conv(callbacks, model, epochs=2):
    pl.Trainer(**trainer_kwargs(callbacks=callbacks, max_epochs=epochs)).fit(
        model, datamodule=StyleData(ConvPool, n=32)
    )
    return plain_state(model)


@functools.cache
def _eager(case: str):
    return _fit_conv(SECOND_GRADIENT[case](), ConvPool())


@functools.cache
def _compile_before_the_fit(style: str) -> None:
    """A plain compiled fit of the same architecture: its backward, compiled at a plain first backward, donates its
    saved activations. Before the fix the callbacks' fits reused it and their second gradients were wrong."""
    _fit_conv([], compiled(ConvPool(), style), epochs=1)


@pytest.mark.parametrize(("style", "case"), INDUCTOR_RUNS)
def test_inductor_second_gradient_equals_eager(style, case):
    """Inductor, the default backend: the same training as eager, on logging steps too (every step here)."""
    _compile_before_the_fit(style)
    state = _fit_conv(SECOND_GRADIENT[case](), compiled(ConvPool(), style))
    for key, value in _eager(case).items():
        torch.testing.assert_close(state[key], value, atol=1e-5, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("case", list(CALLBACKS))
def test_every_callback_with_inductor_encoders_equals_eager(case):
    """Every callback with its encoders compiled by Inductor, the default backend, trains as eager (the conv + pooling
    module, after a plain compiled fit of it; the second-gradient cases above cover the other two compile styles)."""
    spec = CALLBACKS[case]
    _compile_before_the_fit("encoders")

    def fit(model):
        kw = trainer_kwargs(callbacks=spec.factory(None), max_epochs=spec.epochs)
        pl.Trainer(**{**kw, "limit_val_batches": 1.0}).fit(model, datamodule=StyleData(ConvPool, n=32))
        return plain_state(model)

    eager, inductor = fit(ConvPool()), fit(compiled(ConvPool(), "encoders"))
    assert inductor.keys() == eager.keys()
    for key, value in eager.items():
        torch.testing.assert_close(inductor[key], value, atol=1e-5, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def test_retained_graph_settings_held_during_the_fit_and_restored():
    """Donated buffers and Inductor's in-place buffers are off from ``setup`` to ``teardown``; the user's values
    (here in-place buffers already off) come back after the fit."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    seen = []

    class Probe(MMPareto):
        def on_train_start(self, trainer, pl_module):
            super().on_train_start(trainer, pl_module)
            seen.append((functorch_config.donated_buffer, inductor_config.inplace_buffers))

    callbacks = [Probe(), ModalityMonitor(conflict_every_n_steps=1)]
    with functorch_config.patch(donated_buffer=True), inductor_config.patch(inplace_buffers=False):
        pl.Trainer(**trainer_kwargs(callbacks=callbacks, max_steps=1)).fit(STYLE(), datamodule=StyleData(STYLE, n=16))
        assert seen == [(False, False)]
        assert (functorch_config.donated_buffer, inductor_config.inplace_buffers) == (True, False)


def test_retained_graph_settings_restored_when_the_fit_fails():
    """A fit that fails after ``setup`` took the settings (two loss-weighting callbacks) gives them back too."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    before = functorch_config.donated_buffer, inductor_config.inplace_buffers
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[MMPareto(), ARL()], max_steps=1))
    with pytest.raises(MisconfigurationException, match="all set the loss weights"):
        trainer.fit(STYLE(), datamodule=StyleData(STYLE, n=16))
    assert (functorch_config.donated_buffer, inductor_config.inplace_buffers) == before


def test_graphs_compiled_outside_a_fit_are_cleared(monkeypatch):
    """Graphs compiled since the last fit that held the switch may have a backward that donates its activations:
    Dynamo's caches are cleared so that they compile again under the fit's settings; graphs compiled under the
    switch are kept."""
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    holder = object()
    allow_retained_graphs(holder)
    release_retained_graphs(holder)
    resets.clear()
    monkeypatch.setitem(counters["stats"], "unique_graphs", counters["stats"]["unique_graphs"] + 1)
    allow_retained_graphs(holder)
    assert resets == [1]
    monkeypatch.setitem(counters["stats"], "unique_graphs", counters["stats"]["unique_graphs"] + 1)  # in the fit
    release_retained_graphs(holder)
    allow_retained_graphs(holder)
    release_retained_graphs(holder)
    assert resets == [1]
