"""A measurement never changes training, for every entry of ``tests.helpers.harness.CALLBACKS``.

A fit that logs every step (``log_every_n_steps=1``: every step-level value, ``step_ratio``, the monitor's conflict
test at its cadence) ends with bit-identical parameters and buffers to a fit that never logs (a ``log_every_n_steps``
no fit here reaches): same RNG streams, same BatchNorm statistics, same gradients.

The design spends the suite's time where a measurement could reach training:

- every case, eager, on the tiny float64 model: whatever a callback measures on logging steps;
- every case that takes a second gradient of the step's forward (``needs_retained_graph``: MMPareto, ARL's
  ``step_ratio``, the monitor's conflict test, and any callback added later that declares it), eager, on every module
  style of ``tests.helpers.styles`` (BatchNorm, attention, frozen parts, three modalities): the extra autograd passes
  meet each kind of graph;
- the same cases with Inductor-compiled encoders, on the conv + pooling module whose Inductor backward could reuse a
  saved activation in place (``docs/compile.md``). Callbacks that take no second gradient run the same compiled
  graphs whether they log or not (logging only reads values after the backward), so compiling them adds nothing that
  the eager runs do not check; ``tests/test_compile.py`` compiles every case.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from tests.helpers.compiled import ConvPool, compiled, plain_state
from tests.helpers.harness import CALLBACKS
from tests.helpers.styles import STYLES, StyleData, StyleModule
from tests.helpers.tiny import TinyData, TinyModel, trainer_kwargs

NEVER = 10**6
"""A ``log_every_n_steps`` that no fit here reaches."""

SECOND_GRADIENT = [
    name
    for name, case in CALLBACKS.items()
    if any(getattr(cb, "needs_retained_graph", False) for cb in case.factory(None))
]


def _fit(
    name: str, model: pl.LightningModule, data: pl.LightningDataModule, every: int, epochs: int | None = None
) -> dict[str, torch.Tensor]:
    case = CALLBACKS[name]
    encoders = model.encoder_paths if isinstance(model, StyleModule) else None
    kw = trainer_kwargs(
        callbacks=case.factory(encoders),
        max_epochs=epochs or case.epochs,
        limit_val_batches=1.0 if case.needs_val else 0,
        log_every_n_steps=every,
    )
    pl.Trainer(**kw).fit(model, datamodule=data)
    return plain_state(model)


def _assert_identical(logged: dict[str, torch.Tensor], silent: dict[str, torch.Tensor]) -> None:
    assert logged.keys() == silent.keys()
    changed = [k for k in logged if not torch.equal(logged[k], silent[k])]
    assert not changed, f"logging changed {changed}"


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_logging_never_changes_training(name):
    logged, silent = (_fit(name, TinyModel(momentum=0.9), TinyData(n=16), every) for every in (1, NEVER))
    _assert_identical(logged, silent)


def test_second_gradient_cases_are_found():
    assert {"mmpareto", "arl", "monitor"} <= set(SECOND_GRADIENT)


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("name", SECOND_GRADIENT)
def test_second_gradients_never_change_training_on_any_style(name, style):
    """Two epochs of two steps: past ARL's one warm-up epoch, and two of the monitor's conflict steps."""
    cls = STYLES[style]
    logged, silent = (_fit(name, cls(), StyleData(cls, n=16), every, epochs=2) for every in (1, NEVER))
    _assert_identical(logged, silent)


@pytest.mark.parametrize("name", SECOND_GRADIENT)
def test_second_gradients_never_change_training_under_inductor(name):
    data = StyleData(ConvPool, n=16)
    logged, silent = (_fit(name, compiled(ConvPool(), "encoders"), data, every, epochs=2) for every in (1, NEVER))
    _assert_identical(logged, silent)
