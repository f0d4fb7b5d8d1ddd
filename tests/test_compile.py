"""``torch.compile``: every callback with compiled encoders and with a compiled module equals the eager run.

The suite compiles with the ``aot_eager`` backend: it goes through Dynamo and AOTAutograd (where compiled backwards
donate their saved buffers, which broke MMPareto's kept graph) without Inductor's C++ code generation, which would
take minutes on 2 CPU cores. ``tests/test_cuda.py`` compiles with Inductor on a GPU.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_mmbalance import MMPareto, ModalityMonitor
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


def test_retained_graph_setting_restored_after_fit():
    """The callbacks that keep a graph switch AOTAutograd's donated buffers off during the fit only."""
    import torch._functorch.config as functorch_config

    seen = []

    class Probe(MMPareto):
        def on_train_start(self, trainer, pl_module):
            super().on_train_start(trainer, pl_module)
            seen.append(functorch_config.donated_buffer)

    before = functorch_config.donated_buffer
    model = STYLE()
    callbacks = [Probe(), ModalityMonitor(conflict_every_n_steps=1)]
    pl.Trainer(**trainer_kwargs(callbacks=callbacks, max_steps=1)).fit(model, datamodule=StyleData(STYLE, n=16))
    assert seen == [False]
    assert functorch_config.donated_buffer == before
