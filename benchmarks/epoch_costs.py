"""Cost of the epoch-level procedures on the reference CG-Digits model, relative to one training epoch.

- Diagnosing & Re-learning: one diagnosis (feature passes over the training and validation splits, then k-means per
  modality), with all samples and with ``max_samples``.
- Gradient Blending, ``estimator="copies"``: one estimation round (a copy per head trained for
  ``estimation_epochs`` epochs, with the eval passes before and after), for ``estimation_epochs`` 1 and 2.

A training epoch is the median epoch of a plain fit (the first epoch is left out: it warms the process up).

    python benchmarks/epoch_costs.py
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_mmbalance import DiagnosingRelearning, GradientBlending
from lightning_mmbalance.data import CGDigitsDataModule
from lightning_mmbalance.models import LateFusionClassifier


class EpochTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.append(time.perf_counter() - self._start)


def timed(obj: Any, name: str, sink: list[float]) -> None:
    """Record the wall time of every call of ``obj.name``."""
    method = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = method(*args, **kwargs)
        sink.append(time.perf_counter() - start)
        return result

    setattr(obj, name, wrapper)


def fit(callbacks: list[Callback], epochs: int) -> None:
    pl.seed_everything(0, verbose=False)
    dm = CGDigitsDataModule()
    model = LateFusionClassifier(dm.input_shapes, dm.num_classes)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=dm)


def procedure_times(factory: Callable[[], Callback], method: str, epochs: int) -> list[float]:
    callback = factory()
    times: list[float] = []
    timed(callback, method, times)
    fit([callback], epochs)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6, help="epochs of each fit")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    timer = EpochTimer()
    fit([timer], args.epochs)
    epoch = statistics.median(timer.times[1:])
    rows = {
        "DiagnosingRelearning: one diagnosis, all samples": procedure_times(
            lambda: DiagnosingRelearning(every_n_epochs=1, max_reinits=args.epochs), "_diagnose", args.epochs
        ),
        "DiagnosingRelearning: one diagnosis, max_samples=256": procedure_times(
            lambda: DiagnosingRelearning(every_n_epochs=1, max_reinits=args.epochs, max_samples=256),
            "_diagnose",
            args.epochs,
        ),
    }
    for n in (1, 2):
        rows[f"GradientBlending(copies): one round, estimation_epochs={n}"] = procedure_times(
            lambda n=n: GradientBlending(super_epoch=2, estimation_epochs=n), "_copies_round", args.epochs
        )
    print(
        f"CG-Digits, LateFusionClassifier, batch 64; {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. One training epoch: {1000 * epoch:.0f} ms (median of epochs 1-{args.epochs - 1})."
        "\n\n| procedure | median time (ms) | relative to one training epoch |\n|---|---|---|"
    )
    for name, times in rows.items():
        median = statistics.median(times)
        print(f"| {name} | {1000 * median:.0f} | {median / epoch:.2f}x |")


if __name__ == "__main__":
    main()
