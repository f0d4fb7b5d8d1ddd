"""Train the reference model with and without each balancing method, with model selection on validation.

One code path for ``mmbalance compare`` and ``benchmarks/effectiveness.py``: :func:`run_one` trains one
(method, seed, learning rate), keeps the checkpoint with the best validation accuracy and reports its test accuracy
(fused and per modality); :func:`run_grid` does so for every learning rate of a grid and keeps the run with the best
validation accuracy (each method at its own learning rate; the test split never takes part in a choice);
:func:`summarize` turns runs into mean +- std rows.

Times are not compared here: runs made one after another on a shared machine give ratios that do not hold. The
per-step overhead of every method is measured by ``benchmarks/overhead.py`` (interleaved rounds, medians) and the
epoch-level costs by ``benchmarks/epoch_costs.py``.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_mmbalance.callbacks import (
    ARL,
    OGMGE,
    DiagnosingRelearning,
    GradientBlending,
    MMPareto,
    UnimodalLosses,
)
from lightning_mmbalance.callbacks.base import MultimodalCallback, StepSizeWarning
from lightning_mmbalance.callbacks.heldout import collect_features, eval_mode
from lightning_mmbalance.data import CGDigitsDataModule, MultimodalDataModule, PartsDataModule, SyntheticDataModule
from lightning_mmbalance.functional.diagnostics import probe_accuracy
from lightning_mmbalance.models import LateFusionClassifier

__all__ = [
    "DATASETS",
    "DEFAULT_LRS",
    "METHODS",
    "RunResult",
    "Summary",
    "format_table",
    "make_datamodule",
    "method_callbacks",
    "plot_summary",
    "run_grid",
    "run_one",
    "summarize",
]

DEFAULT_LRS: tuple[float, ...] = (0.01, 0.03, 0.1)
"""The learning-rate grid of ``mmbalance compare`` (SGD with momentum 0.9; the reference model's default is 0.01)."""


def _scaled(fraction: float, max_epochs: int) -> int:
    """An epoch count that is ``fraction`` of the run, at least 1."""
    return max(1, round(fraction * max_epochs))


# Non-schedule arguments are the callbacks' documented defaults. Epoch schedules, which the official scripts set for
# runs of 90-100 epochs, are scaled to the run length with the official fractions. The second argument is the
# scaling methods' `modulate` ("update" for Adam-type optimizers).
_METHOD_FACTORIES: dict[str, Callable[[int, str], list[Callback]]] = {
    "baseline": lambda epochs, mode: [],
    "uniform": lambda epochs, mode: [UnimodalLosses()],
    "ogm_ge": lambda epochs, mode: [OGMGE(modulation_ends=_scaled(0.5, epochs), modulate=mode)],  # official 0-50/100
    "ogm_ge_0.8": lambda epochs, mode: [OGMGE(alpha=0.8, modulation_ends=_scaled(0.5, epochs), modulate=mode)],
    "mmpareto": lambda epochs, mode: [MMPareto(modulate=mode)],
    "arl": lambda epochs, mode: [ARL(warmup_epochs=_scaled(0.06, epochs), modulate=mode)],  # official: 6 of 100
    "gradient_blending": lambda epochs, mode: [GradientBlending(super_epoch=_scaled(0.2, epochs))],
    "relearning": lambda epochs, mode: [DiagnosingRelearning(every_n_epochs=_scaled(0.22, epochs))],  # 20 of 90
}
METHODS: tuple[str, ...] = tuple(_METHOD_FACTORIES)
"""Every method ``compare`` knows, in table order."""

_DATASET_FACTORIES: dict[str, Callable[[int], MultimodalDataModule]] = {
    "cg-digits": lambda batch_size: CGDigitsDataModule(batch_size=batch_size),
    "synthetic": lambda batch_size: SyntheticDataModule(batch_size=batch_size),
    "synthetic3": lambda batch_size: SyntheticDataModule(num_modalities=3, batch_size=batch_size),
    "parts": lambda batch_size: PartsDataModule(batch_size=batch_size),
}
DATASETS: tuple[str, ...] = tuple(_DATASET_FACTORIES)
"""Every built-in data set ``compare`` knows."""


def method_callbacks(method: str, max_epochs: int, modulate: str = "gradient") -> list[Callback]:
    """The callbacks of ``method`` for a run of ``max_epochs`` (empty for the joint-loss baseline)."""
    if method not in _METHOD_FACTORIES:
        raise ValueError(f"Unknown method {method!r}; available: {METHODS}.")
    return _METHOD_FACTORIES[method](max_epochs, modulate)


def make_datamodule(dataset: str, batch_size: int = 64) -> MultimodalDataModule:
    """The built-in data set named ``dataset`` (fixed split seed, so every method sees the same data)."""
    if dataset not in _DATASET_FACTORIES:
        raise ValueError(f"Unknown dataset {dataset!r}; available: {DATASETS}.")
    return _DATASET_FACTORIES[dataset](batch_size)


@dataclass
class RunResult:
    """One (method, seed, learning rate) run: test accuracies of the best-validation checkpoint and what it took.

    ``val_acc`` is that checkpoint's validation accuracy, which :func:`run_grid` compares across learning rates;
    ``grid`` holds every learning rate's ``val_acc`` when the run was chosen from a grid. ``fit_time`` is the wall
    time of ``Trainer.fit`` (not comparable across runs made one after another on a shared machine). ``warnings``
    are the step-size warnings the callbacks raised during the fit, ``step_ratio`` the median over the logged steps of
    each modality's ``step_ratio`` (how much the method enlarged that encoder's step; empty for methods that do not
    scale).
    """

    method: str
    seed: int
    test_acc: float
    modality_acc: dict[str, float]
    val_acc: float
    best_epoch: int
    log_dir: str
    lr: float = float("nan")
    probe_acc: dict[str, float] = field(default_factory=dict)
    fit_time: float = float("nan")
    grid: dict[float, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    step_ratio: dict[str, float] = field(default_factory=dict)


class _StepRatios(Callback):
    """Every logged ``mmbalance/<method>/step_ratio/<modality>`` value of the fit."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        for key, value in trainer.callback_metrics.items():
            if "/step_ratio/" in key and MultimodalCallback.logs_this_step(trainer):
                self.values.setdefault(key.rsplit("/", 1)[-1], []).append(float(value))

    def medians(self) -> dict[str, float]:
        return {m: statistics.median(v) for m, v in self.values.items()}


def _logger(out_dir: Path, name: str, version: str) -> Logger:
    try:
        return TensorBoardLogger(out_dir, name=name, version=version, default_hp_metric=False)
    except ModuleNotFoundError:  # tensorboard is an optional extra
        return CSVLogger(out_dir, name=name, version=version)


def run_one(
    method: str,
    seed: int,
    dataset: str = "cg-digits",
    max_epochs: int = 20,
    lr: float | None = None,
    out_dir: str | Path = "mmbalance_runs",
    model_kwargs: dict[str, Any] | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    probe: bool = False,
) -> RunResult:
    """Train ``method`` on ``dataset`` with ``seed`` and ``lr``; test the checkpoint with the best validation accuracy.

    Model selection uses the validation split only; the test split is evaluated once, on that checkpoint. With
    ``probe``, a linear probe per modality is fitted on that checkpoint's training features and scored on the test
    split. ``lr`` None keeps the reference model's default (0.01).
    """
    result, model, dm = _train(method, seed, dataset, max_epochs, lr, Path(out_dir), model_kwargs, trainer_kwargs)
    if probe:
        result.probe_acc = _probe(model, dm)
    return result


def run_grid(
    method: str,
    seed: int,
    lrs: Sequence[float] = DEFAULT_LRS,
    dataset: str = "cg-digits",
    max_epochs: int = 20,
    out_dir: str | Path = "mmbalance_runs",
    model_kwargs: dict[str, Any] | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    probe: bool = False,
) -> RunResult:
    """:func:`run_one` at every learning rate of ``lrs``; the run with the best validation accuracy is returned.

    Ties go to the first learning rate of the grid. The test split only reports the chosen run. The probes, if asked
    for, are fitted for the chosen run only.
    """
    if not lrs:
        raise ValueError("`lrs` must hold at least one learning rate.")
    best: tuple[RunResult, LateFusionClassifier, MultimodalDataModule] | None = None
    grid = {}
    for lr in lrs:
        trained = _train(method, seed, dataset, max_epochs, lr, Path(out_dir), model_kwargs, trainer_kwargs)
        grid[lr] = trained[0].val_acc
        if best is None or trained[0].val_acc > best[0].val_acc:
            best = trained
    assert best is not None
    result, model, dm = best
    result.grid = grid
    if probe:
        result.probe_acc = _probe(model, dm)
    return result


def _train(
    method: str,
    seed: int,
    dataset: str,
    max_epochs: int,
    lr: float | None,
    out: Path,
    model_kwargs: dict[str, Any] | None,
    trainer_kwargs: dict[str, Any] | None,
) -> tuple[RunResult, LateFusionClassifier, MultimodalDataModule]:
    pl.seed_everything(seed, workers=True, verbose=False)
    dm = make_datamodule(dataset)
    model_args = {**(model_kwargs or {}), **({"lr": lr} if lr is not None else {})}
    # Adam-type optimizers undo a constant gradient scale: the scaling methods then scale the update instead.
    modulate = "update" if model_args.get("optimizer", "sgd") != "sgd" else "gradient"
    model = LateFusionClassifier(dm.input_shapes, dm.num_classes, **model_args)
    name = f"{method}-seed{seed}" + (f"-lr{lr:g}" if lr is not None else "")
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints" / dataset / name, monitor="val/acc", mode="max")
    kwargs: dict[str, Any] = dict(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=_logger(out, f"{dataset}/{method}", name.removeprefix(f"{method}-")),
        callbacks=[*method_callbacks(method, max_epochs, modulate), ckpt, ratios := _StepRatios()],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=5,
    )
    kwargs.update(trainer_kwargs or {})
    trainer = pl.Trainer(**kwargs)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StepSizeWarning)
        trainer.fit(model, datamodule=dm)
    fit_time = time.perf_counter() - start
    for w in caught:  # the others go on to the caller's filters
        if not issubclass(w.category, StepSizeWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    (metrics,) = trainer.test(model, datamodule=dm, ckpt_path="best", verbose=False)
    best = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)
    result = RunResult(
        method=method,
        seed=seed,
        test_acc=float(metrics["test/acc"]),
        modality_acc={m: float(metrics[f"test/acc_{m}"]) for m in dm.modalities},
        val_acc=float(ckpt.best_model_score or 0.0),
        best_epoch=int(best["epoch"]),
        log_dir=str(trainer.logger.log_dir) if trainer.logger is not None else "",
        lr=float(model.hparams["lr"]),
        fit_time=fit_time,
        warnings=[str(w.message) for w in caught if issubclass(w.category, StepSizeWarning)],
        step_ratio=ratios.medians(),
    )
    return result, model, dm


def _probe(model: LateFusionClassifier, dm: MultimodalDataModule) -> dict[str, float]:
    """Linear-probe test accuracy of each encoder's features (the probe is fitted on the training split)."""
    assert dm.train_set is not None and dm.test_set is not None, "the data module is set up by the fit"
    with eval_mode(model):
        train_x, train_y, _ = collect_features(model, DataLoader(dm.train_set, 256), dm.modalities, None, "probe")
        test_x, test_y, _ = collect_features(model, DataLoader(dm.test_set, 256), dm.modalities, None, "probe")
    return {m: probe_accuracy(train_x[m], train_y, test_x[m], test_y) for m in dm.modalities}


@dataclass
class Summary:
    """Mean and standard deviation over seeds of one method's runs, with the learning rate chosen for each seed."""

    method: str
    test_acc: tuple[float, float]
    modality_acc: dict[str, tuple[float, float]]
    lrs: list[float] = field(default_factory=list)
    probe_acc: dict[str, tuple[float, float]] = field(default_factory=dict)
    runs: list[RunResult] = field(default_factory=list)

    @property
    def warnings(self) -> int:
        """How many step-size warnings the runs raised."""
        return sum(len(r.warnings) for r in self.runs)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: Sequence[RunResult]) -> list[Summary]:
    """Group runs by method (in :data:`METHODS` order): mean +- std over seeds, and the chosen learning rates."""
    by_method: dict[str, list[RunResult]] = {}
    for r in results:
        by_method.setdefault(r.method, []).append(r)
    rows = []
    for method in sorted(by_method, key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS)):
        runs = sorted(by_method[method], key=lambda r: r.seed)
        modalities = list(runs[0].modality_acc)
        rows.append(
            Summary(
                method=method,
                test_acc=_mean_std([r.test_acc for r in runs]),
                modality_acc={m: _mean_std([r.modality_acc[m] for r in runs]) for m in modalities},
                lrs=[r.lr for r in runs],
                probe_acc={m: _mean_std([r.probe_acc[m] for r in runs]) for m in runs[0].probe_acc},
                runs=runs,
            )
        )
    return rows


def format_lrs(lrs: Sequence[float]) -> str:
    """The chosen learning rates, one per seed: ``"0.01 (all)"`` when they agree, else ``"0.01, 0.03"``."""
    if len(set(lrs)) == 1 and len(lrs) > 1:
        return f"{lrs[0]:g} (all)"
    return ", ".join(f"{lr:g}" for lr in lrs)


def format_table(rows: Sequence[Summary]) -> str:
    """A fixed-width text table: fused and per-modality test accuracy (mean +- std, %) and the chosen lrs."""
    modalities = list(rows[0].modality_acc) if rows else []
    header = ["method", "fused acc", *(f"{m} acc" for m in modalities), "lr per seed", "seeds"]
    lines = [header]
    for r in rows:
        cells = [f"{100 * r.test_acc[0]:.1f} ± {100 * r.test_acc[1]:.1f}"]
        cells += [f"{100 * r.modality_acc[m][0]:.1f} ± {100 * r.modality_acc[m][1]:.1f}" for m in modalities]
        lines.append([r.method, *cells, format_lrs(r.lrs), str(len(r.runs))])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def plot_summary(rows: Sequence[Summary], path: str | Path, title: str = "") -> Path:
    """A bar chart of fused and per-modality test accuracy per method (mean +- std), saved as PNG."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are left alone

    modalities = list(rows[0].modality_acc)
    groups = ["fused", *modalities]
    width = 0.8 / len(groups)
    fig = Figure(figsize=(1.6 + 1.3 * len(rows), 3.6))
    ax = fig.subplots()
    for i, group in enumerate(groups):
        stats = [r.test_acc if group == "fused" else r.modality_acc[group] for r in rows]
        xs = [k + (i - (len(groups) - 1) / 2) * width for k in range(len(rows))]
        ax.bar(xs, [100 * m for m, _ in stats], width, yerr=[100 * s for _, s in stats], label=group, capsize=2)
    ax.set_xticks(range(len(rows)), [r.method for r in rows])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(ncols=len(groups), fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    return out
