"""Compare balancing methods on any LightningModule and LightningDataModule, with model selection on validation only.

The engine of ``mmbalance compare`` and ``benchmarks/effectiveness.py``; :func:`compare` is its Python entry point.
Every run is one (method, learning rate, seed): a fresh model and data module, the user's Trainer arguments and
callbacks plus the method's own callbacks, the checkpoint with the best validation accuracy of the fused prediction,
and that checkpoint's test accuracy (fused and per modality). Per method and seed, the learning rate whose run has the
best validation accuracy is chosen; the test split never takes part in a choice. A run that a balancing callback stops
with :class:`~lightning_mmbalance.DivergenceError` (NaN or infinite values) is recorded as diverged and never chosen,
and the grid goes on.

Accuracies come from the contract (``docs/contract.md``): ``module(batch)`` returns a
:class:`~lightning_mmbalance.MultimodalOutput`, whose ``logits`` give the fused accuracy and whose ``unimodal_logits``
give each modality's. Every finished run is stored in ``<output>/<name>/<method>/lr<lr>-seed<seed>/result.json``
with a hash of everything that shaped it, so a comparison that is run again reads its finished runs back instead of
training them again, and a changed configuration is refused instead of being mixed with the old results.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader

from lightning_mmbalance.callbacks import BalancingCallback, MultimodalCallback
from lightning_mmbalance.callbacks.base import DivergenceError, StepSizeWarning
from lightning_mmbalance.callbacks.heldout import collect_features, eval_mode
from lightning_mmbalance.contract import MultimodalOutput, resolve_encoders, validate_output
from lightning_mmbalance.experiment import (
    DATASETS,
    DEFAULT_LRS,
    METHODS,
    WALL_TIME_NOTE,
    RunResult,
    Summary,
    format_duration,
    format_table,
    make_datamodule,
    method_callbacks,
    plot_summary,
    summarize,
    write_results,
)
from lightning_mmbalance.functional.diagnostics import probe_accuracy
from lightning_mmbalance.models import LateFusionClassifier

__all__ = [
    "Built",
    "CompareError",
    "Comparison",
    "ContractAccuracy",
    "Method",
    "Setup",
    "check_grid",
    "compare",
    "describe_run_setup",
    "reference_model",
    "resolve_lr_argument",
    "resolve_method",
    "run_comparison",
    "trainer_arguments",
]


class CompareError(ValueError):
    """A comparison that cannot run as configured; raised before any run is trained (or before a run's fit)."""


VAL_KEY = "mmbalance/compare/val_acc/fused"
"""The logged quantity the checkpoint of every run is chosen by."""

_RESULT_FILE = "result.json"
_FORMAT = 1
# Trainer arguments that do not change what a run learns, so they are left out of the configuration hash.
_NOT_HASHED = frozenset({"logger", "enable_progress_bar", "enable_model_summary", "default_root_dir"})
# Launchers that run the fit in processes of their own, whose callbacks the comparison cannot read afterwards.
_IN_OTHER_PROCESSES = ("ddp_spawn", "ddp_fork", "ddp_notebook")
_TRAINER_DEFAULTS: dict[str, Any] = {
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}
# The reference model is tiny: one CPU process trains it fastest.
_REFERENCE_TRAINER: dict[str, Any] = {"accelerator": "cpu", "devices": 1, "log_every_n_steps": 5}


class ContractAccuracy(Callback):
    """Fused and per-modality accuracy of every validation and test epoch, from the module's ``MultimodalOutput``.

    At the end of each validation and test batch it calls ``pl_module(batch)`` (one extra forward, in eval mode and
    without gradients) and counts the correct argmax predictions of ``logits`` and of every ``unimodal_logits[m]``;
    the counts are summed over ranks at the end of the epoch and logged as ``mmbalance/compare/<stage>_acc/fused``
    and ``mmbalance/compare/<stage>_acc/<m>`` (``stage`` is ``val`` or ``test``). A module whose output has no
    ``unimodal_logits`` gets the fused accuracy only.

    Example::

        trainer = Trainer(callbacks=[ContractAccuracy()])
        trainer.fit(model, datamodule=dm)
        (metrics,) = trainer.test(model, datamodule=dm)
        metrics["mmbalance/compare/test_acc/fused"]
    """

    def __init__(self) -> None:
        self.heads: list[str] = []
        self.val_history: list[tuple[int, float]] = []
        self._counts: torch.Tensor | None = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the counts of the epoch (also for the test epoch)."""
        self._counts = None

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Count the batch's correct predictions of every head (also for the test batches)."""
        self._count(trainer, pl_module, batch)

    on_test_batch_end = on_validation_batch_end

    def _count(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            output = pl_module(batch)
        if not isinstance(output, MultimodalOutput):
            raise TypeError(
                f"`{type(pl_module).__name__}(batch)` returned a {type(output).__name__}; the comparison reads its "
                "accuracies from the module's forward, which must return `MultimodalOutput(logits=..., "
                "unimodal_logits=..., targets=...)` (see docs/contract.md)."
            )
        validate_output(output, values=False)
        self.heads = ["fused", *output.unimodal_logits]
        logits = [output.logits, *output.unimodal_logits.values()]
        correct = [(z.argmax(-1) == output.targets).sum() for z in logits]
        counts = torch.stack([*correct, torch.tensor(len(output.targets), device=output.targets.device)]).double()
        self._counts = counts if self._counts is None else self._counts + counts

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the validation accuracies and remember the fused one (not during the sanity check)."""
        if trainer.sanity_checking or self._counts is None:
            return
        fused = self._log("val", trainer, pl_module)
        self.val_history.append((trainer.current_epoch, fused))

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the test accuracies."""
        if self._counts is not None:
            self._log("test", trainer, pl_module)

    def _log(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        assert self._counts is not None
        totals = trainer.strategy.reduce(self._counts, reduce_op="sum")  # the same on every rank afterwards
        accuracies = totals[:-1] / totals[-1].clamp_min(1)
        for head, acc in zip(self.heads, accuracies, strict=True):
            pl_module.log(f"mmbalance/compare/{stage}_acc/{head}", acc.float(), on_epoch=True)
        return float(accuracies[0])

    def best(self) -> tuple[float, int]:
        """The best validation accuracy of the fused prediction and its epoch (the first one on a tie)."""
        epoch, acc = max(self.val_history, key=lambda h: (h[1], -h[0]))
        return acc, epoch


class _LearningRateCheck(Callback):
    """Warns when no parameter group of the module's optimizers starts at the run's learning rate."""

    def __init__(self, lr: float, argument: str) -> None:
        self.lr = lr
        self.argument = argument

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        found = [g.get("initial_lr", g["lr"]) for opt in trainer.optimizers for g in opt.param_groups]
        if not any(math.isclose(lr, self.lr, rel_tol=1e-6) for lr in found):
            warnings.warn(
                f"No parameter group of the optimizers starts at the run's learning rate {self.lr:g} (found "
                f"{sorted(set(found))}): `configure_optimizers` should use the `{self.argument}` init argument, "
                f"e.g. `SGD(self.parameters(), lr=self.hparams.{self.argument})`.",
                UserWarning,
                stacklevel=1,  # attributed to this module, not to Lightning's (whose warnings the CLI hides)
            )


class _StepRatios(Callback):
    """Every logged ``mmbalance/<method>/step_ratio/<modality>`` value of the fit."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not MultimodalCallback.logs_this_step(trainer):
            return
        for key, value in trainer.callback_metrics.items():
            if "/step_ratio/" in key:
                self.values.setdefault(key.rsplit("/", 1)[-1], []).append(float(value))

    def medians(self) -> dict[str, float]:
        return {m: statistics.median(v) for m, v in self.values.items()}


@dataclass(frozen=True)
class Method:
    """One column of the comparison: a name, the callbacks it adds to a run of ``epochs`` epochs, its description.

    Example::

        method = resolve_method("OGMGE", {"alpha": 0.8})
        method.callbacks(30)   # [OGMGE(alpha=0.8)]
    """

    name: str
    callbacks: Callable[[int], list[Callback]]
    description: dict[str, Any]


def _method_classes() -> dict[str, type[Callback]]:
    """The callback classes of the package's public API that a comparison can add (not the two base classes)."""
    import lightning_mmbalance as package

    found = {name: getattr(package, name) for name in package.__all__}
    return {
        name: obj
        for name, obj in found.items()
        if isinstance(obj, type) and issubclass(obj, Callback) and obj not in (BalancingCallback, MultimodalCallback)
    }


def resolve_method(name: str, args: Mapping[str, Any] | None = None, modulate: str = "gradient") -> Method:
    """The :class:`Method` called ``name``.

    Args:
        name: ``"baseline"`` (no callback), a callback class exported by ``lightning_mmbalance`` (``"OGMGE"``,
            ``"UnimodalLosses"``...), or a built-in preset of :data:`~lightning_mmbalance.experiment.METHODS`
            (``"ogm_ge"``..., documented defaults with epoch schedules scaled to the run length).
        args: a class's init arguments, e.g. ``{"alpha": 0.8}``; or ``{"class_path": "OGMGE", "init_args": {...}}``
            to give a class under another name (two settings of one method side by side). Presets take none.
        modulate: the presets' ``modulate`` (``"update"`` for Adam-type optimizers).

    Raises:
        CompareError: an unknown name, arguments for a preset, or an init argument the class refuses.
    """
    spec = dict(args or {})
    if "class_path" in spec:
        class_name, init = str(spec.pop("class_path")), dict(spec.pop("init_args", None) or {})
        if spec:
            raise CompareError(
                f"Method {name!r}: besides `class_path` only `init_args` is accepted, got {sorted(spec)}."
            )
    else:
        class_name, init = name, spec
    class_name = class_name.removeprefix("lightning_mmbalance.")
    if class_name in METHODS:
        if init:
            raise CompareError(
                f"Method {name!r} is a built-in preset and takes no arguments, got {init}; give a class name "
                f"(e.g. `OGMGE: {{alpha: 0.8}}`) to set arguments."
            )
        return Method(
            name,
            lambda epochs: method_callbacks(class_name, epochs, modulate),
            {"preset": class_name, "modulate": modulate},
        )
    classes = _method_classes()
    cls = classes.get(class_name)
    if cls is None:
        raise CompareError(
            f"Unknown method {name!r}: expected 'baseline', a callback class of lightning_mmbalance "
            f"({', '.join(sorted(classes))}) or a built-in preset ({', '.join(METHODS)})."
        )
    try:
        cls(**init)  # the callback validates its arguments: fail now, not after hours of training
    except (TypeError, ValueError) as error:
        raise CompareError(f"Method {name!r}: {error}") from error
    return Method(
        name,
        lambda epochs: [cls(**init)],
        {"class_path": f"lightning_mmbalance.{class_name}", "init_args": _jsonable(_with_defaults(cls, init))},
    )


def resolve_lr_argument(model: Callable[..., Any], lr_arg: str | None = None) -> str:
    """The init argument of ``model`` that takes the learning rate: ``lr_arg``, else ``lr``, else ``learning_rate``.

    Raises:
        CompareError: the model has no such argument; the message says how to add one.
    """
    parameters = inspect.signature(model).parameters
    name = getattr(model, "__qualname__", type(model).__name__)
    if lr_arg is not None:
        if lr_arg not in parameters:
            raise CompareError(f"`{name}` has no init argument {lr_arg!r} (`lr_arg`); it has {list(parameters)}.")
        return lr_arg
    for candidate in ("lr", "learning_rate"):
        if candidate in parameters:
            return candidate
    raise CompareError(
        f"`{name}.__init__` has no `lr` or `learning_rate` argument, so the comparison cannot set each run's learning "
        "rate. Add one, e.g. `def __init__(self, ..., lr: float = 1e-3)` with `self.save_hyperparameters()`, and use "
        "`self.hparams.lr` in `configure_optimizers`; or name your argument with `--lr-arg NAME` (`lr_arg=` in "
        "Python)."
    )


def _with_defaults(target: Callable[..., Any], args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` completed with the defaults of ``target``'s signature, None values dropped (a stable description)."""
    parameters = inspect.signature(target).parameters.values()
    full = {p.name: p.default for p in parameters if p.default is not p.empty and p.kind is not p.VAR_KEYWORD}
    full.update(args)
    return {k: v for k, v in full.items() if v is not None}


def _jsonable(value: Any) -> Any:
    """A JSON description of ``value``: plain data as is; an object as its class and its hyper-parameters."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, type) or inspect.isroutine(value):
        return f"{value.__module__}.{value.__qualname__}"
    hparams = getattr(value, "hparams", None)
    attrs = dict(hparams) if hparams else {k: v for k, v in vars(value).items() if not k.startswith("_")}
    plain = {k: v for k, v in attrs.items() if v is None or isinstance(v, bool | int | float | str | list | tuple)}
    return {"class_path": f"{type(value).__module__}.{type(value).__qualname__}", "init_args": _jsonable(plain)}


def _config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys where two JSON descriptions differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


Built = tuple[pl.LightningModule, pl.LightningDataModule, list[Callback]]
"""What :attr:`Setup.build` returns for one run: the model, the data module and the user's own callbacks."""


@dataclass
class Setup:
    """What every run of a comparison is built from; :func:`compare` and ``mmbalance compare`` make one.

    Args:
        build: learning rate -> a fresh model (with that learning rate), data module and list of the user's own
            Trainer callbacks; called after the run's seed is set.
        trainer_args: the user's other Trainer arguments (accelerator, devices, strategy, precision...).
        config: a JSON description of everything above, hashed into every run's result (the learning rate excluded).
        name: the folder under the output that holds the runs (the data set's name).
        epochs: training epochs of every run.
        probe: also fit a linear probe on each encoder's features (needs a data module with ``train_set`` and
            ``test_set`` and a module with ``MultimodalOutput.features``).

    Example::

        setup = Setup(build=lambda lr: (MyModel(lr=lr), MyData(), []), trainer_args={}, config={...}, name="mydata",
                      epochs=30)
    """

    build: Callable[[float], Built]
    trainer_args: dict[str, Any]
    config: dict[str, Any]
    name: str
    epochs: int
    probe: bool = False


@dataclass
class Comparison:
    """What :func:`compare` returns.

    Attributes:
        rows: one :class:`~lightning_mmbalance.experiment.Summary` per method (mean and std over seeds).
        runs: the chosen run of every (method, seed), with every learning rate's validation accuracy in ``grid``.
        all_runs: every (method, learning rate, seed) run, trained now or read back.
        output: the output folder.
        complete: False when ``max_runs`` stopped the comparison before every run was trained.
    """

    rows: list[Summary]
    runs: list[RunResult]
    all_runs: list[RunResult]
    output: Path
    complete: bool = True

    def __str__(self) -> str:
        return format_table(self.rows)


def _other_processes(strategy: str) -> str:
    return (
        f"Strategy {strategy!r} fits in processes it starts and keeps their state there, but the comparison reads the "
        "callbacks' state after each fit: use strategy='ddp' from a script or the command line (every process runs "
        "the whole comparison; rank 0 writes)."
    )


def _no_step(*args: Any, **kwargs: Any) -> None:
    """The validation or test step of a module that has none: the comparison measures the accuracies itself."""


def _rank_zero() -> bool:
    """Whether this is global rank 0 (Lightning sets the rank at import from the launcher's environment)."""
    return getattr(rank_zero_only, "rank", 0) == 0


def _check_data(dm: pl.LightningDataModule) -> None:
    missing = [
        f"{split}_dataloader" for split in ("train", "val", "test") if not is_overridden(f"{split}_dataloader", dm)
    ]
    if missing:
        raise CompareError(
            f"`{type(dm).__name__}` does not define {', '.join(missing)}: the comparison trains on the training split, "
            "chooses the checkpoint and learning rate on the validation split and reports the test split, so the data "
            "module must define `train_dataloader`, `val_dataloader` and `test_dataloader`."
        )


def _logger(out_dir: Path, name: str, version: str) -> Logger:
    try:
        return TensorBoardLogger(out_dir, name=name, version=version, default_hp_metric=False)
    except ModuleNotFoundError:  # tensorboard is an optional extra
        return CSVLogger(out_dir, name=name, version=version)


def _probe(model: pl.LightningModule, dm: pl.LightningDataModule) -> dict[str, float]:
    """Linear-probe test accuracy of each encoder's features (the probe is fitted on the training split)."""
    modalities = list(resolve_encoders(model))
    with eval_mode(model):
        loaders = [DataLoader(getattr(dm, f"{split}_set"), 256) for split in ("train", "test")]
        (train_x, train_y, _), (test_x, test_y, _) = (
            collect_features(model, loader, modalities, None, "probe") for loader in loaders
        )
    return {m: probe_accuracy(train_x[m], train_y, test_x[m], test_y) for m in modalities}


def _train(setup: Setup, method: Method, lr: float, seed: int, run_dir: Path, lr_arg: str) -> RunResult:
    """Train one run, test its best-validation checkpoint and return what it gave (a diverged run is not tested)."""
    pl.seed_everything(seed, workers=True, verbose=False)
    model, dm, user_callbacks = setup.build(lr)
    _check_data(dm)
    for stage in ("validation", "test"):
        if not is_overridden(f"{stage}_step", model):  # the accuracies are measured by ContractAccuracy
            setattr(model, f"{stage}_step", _no_step)
    accuracy, ratios = ContractAccuracy(), _StepRatios()
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",  # not the logger's folder, which Lightning would warn about
        filename="best",
        monitor=VAL_KEY,
        mode="max",
        save_weights_only=True,
        enable_version_counter=False,
    )
    logger = setup.trainer_args.get("logger", True)
    kwargs = {
        **_TRAINER_DEFAULTS,
        **setup.trainer_args,
        "max_epochs": setup.epochs,
        "logger": _logger(run_dir.parent.parent, run_dir.parent.name, run_dir.name) if logger else False,
        "callbacks": [
            *user_callbacks,  # the user's callbacks stay; the method's are added
            *method.callbacks(setup.epochs),
            accuracy,
            ratios,
            _LearningRateCheck(lr, lr_arg),
            checkpoint,
        ],
    }
    trainer = pl.Trainer(**kwargs)
    if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):  # e.g. chosen by "auto" in a notebook
        raise CompareError(_other_processes(type(trainer.strategy).__name__))
    start = time.perf_counter()
    diverged = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StepSizeWarning)
        try:
            trainer.fit(model, datamodule=dm)
        except DivergenceError as err:  # raised on every rank at the same step: a result of the grid, not a failure
            diverged = str(err)
    for w in caught:  # the others go on to the caller's filters
        if not issubclass(w.category, StepSizeWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    step_warnings = [str(w.message) for w in caught if issubclass(w.category, StepSizeWarning)]
    if diverged:
        return RunResult(
            method=method.name,
            seed=seed,
            test_acc=math.nan,
            modality_acc={},
            val_acc=math.nan,
            best_epoch=-1,
            log_dir=str(run_dir),
            lr=lr,
            fit_time=time.perf_counter() - start,
            warnings=step_warnings,
            step_ratio=ratios.medians(),
            diverged=diverged,
        )
    if not accuracy.val_history:
        raise RuntimeError(
            f"The run {run_dir} never validated, so no checkpoint can be chosen: check `limit_val_batches`, "
            "`check_val_every_n_epoch` and that the validation loader is not empty."
        )
    (metrics,) = trainer.test(model, datamodule=dm, ckpt_path=checkpoint.best_model_path, verbose=False)
    val_acc, best_epoch = accuracy.best()
    prefix = "mmbalance/compare/test_acc/"
    return RunResult(
        method=method.name,
        seed=seed,
        test_acc=float(metrics[f"{prefix}fused"]),
        modality_acc={
            k.removeprefix(prefix): float(v)
            for k, v in metrics.items()
            if k.startswith(prefix) and k != f"{prefix}fused"
        },
        val_acc=val_acc,
        best_epoch=best_epoch,
        log_dir=str(run_dir),
        lr=lr,
        probe_acc=_probe(model, dm) if setup.probe else {},
        fit_time=time.perf_counter() - start,
        warnings=step_warnings,
        step_ratio=ratios.medians(),
    )


def _read_back(path: Path, config: dict[str, Any]) -> RunResult | None:
    """The stored result of a run with this configuration; None when the run has not finished.

    Raises:
        CompareError: the run finished with another configuration.
    """
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    if stored.get("hash") != _config_hash(config):
        changes = _differences(stored.get("config", {}), config)
        raise CompareError(
            f"{path.parent} holds a run made with another configuration ({'; '.join(changes[:8]) or 'format'}). "
            "Results of different configurations are not mixed: give another output folder, or delete the old runs "
            "to train them again."
        )
    return RunResult(**stored["result"])


def run_comparison(
    setup: Setup,
    methods: Sequence[Method],
    lrs: Sequence[float],
    seeds: int,
    output: str | Path,
    lr_arg: str = "lr",
    max_runs: int | None = None,
    verbose: bool = True,
) -> Comparison:
    """Train every (method, learning rate, seed) run not yet in ``output``, then choose and summarise.

    A run that diverges (:class:`~lightning_mmbalance.DivergenceError`) is stored and read back like a finished one,
    and never chosen; a seed whose every learning rate diverged is reported as such.

    Args:
        setup: what the runs are built from.
        methods: the methods, in the order they are trained.
        lrs: the learning-rate grid, every value > 0.
        seeds: the number of seeds (0, 1, ...).
        output: the output folder; runs already finished there with the same configuration are read back.
        lr_arg: the model's init argument that takes the learning rate (named in the warning when it has no effect).
        max_runs: train at most this many runs, then return (``complete=False``); None trains them all.
        verbose: print progress, the table and the output files.

    Returns:
        The summary; on global rank 0 the tables, ``results.json`` and ``summary.png`` are written to the output.

    Raises:
        CompareError: a run in ``output`` was made with another configuration.
    """
    out = Path(output)
    say = print if verbose and _rank_zero() else lambda *a, **k: None
    grid = [(m, seed, lr) for m in methods for seed in range(seeds) for lr in lrs]
    folders = {(m.name, seed, lr): out / setup.name / m.name / f"lr{lr:g}-seed{seed}" for m, seed, lr in grid}
    configs = {
        (m.name, seed, lr): {"format": _FORMAT, **setup.config, "method": m.description, "lr": lr, "seed": seed}
        for m, seed, lr in grid
    }
    results = {key: r for key in folders if (r := _read_back(folders[key] / _RESULT_FILE, configs[key])) is not None}
    todo = [(m, seed, lr) for m, seed, lr in grid if (m.name, seed, lr) not in results]
    say(
        f"{len(grid)} runs ({len(methods)} method(s) x {len(lrs)} learning rate(s) x {seeds} seed(s)): "
        f"{len(results)} read back from {out}, {len(todo)} to train.",
        flush=True,
    )
    durations: list[float] = []
    for i, (method, seed, lr) in enumerate(todo[:max_runs]):
        key = (method.name, seed, lr)
        folder = folders[key]
        if _rank_zero() and folder.exists():
            shutil.rmtree(folder)  # what an interrupted attempt left behind
        start = time.perf_counter()
        result = _train(setup, method, lr, seed, folder, lr_arg)
        durations.append(time.perf_counter() - start)
        results[key] = result
        if _rank_zero():
            folder.mkdir(parents=True, exist_ok=True)  # a run that diverged early may have written nothing yet
            stored = {"hash": _config_hash(configs[key]), "config": configs[key], "result": asdict(result)}
            (folder / _RESULT_FILE).write_text(json.dumps(stored, indent=1))
        left = len(todo[:max_runs]) - i - 1
        outcome = (
            "diverged"
            if result.diverged
            else f"val acc {100 * result.val_acc:.1f}%, test acc {100 * result.test_acc:.1f}%"
        )
        say(
            f"[{len(grid) - len(todo) + i + 1}/{len(grid)}] {method.name} lr {lr:g} seed {seed}: {outcome} "
            f"({format_duration(durations[-1])}"
            + (f"; about {format_duration(statistics.fmean(durations) * left)} left)" if left else ")"),
            flush=True,
        )
        for warning in result.warnings:
            say(f"    step-size warning: {warning}", flush=True)
        if result.diverged:
            say(f"    DivergenceError: {result.diverged}", flush=True)
    all_runs = [results[(m.name, seed, lr)] for m, seed, lr in grid if (m.name, seed, lr) in results]
    if len(all_runs) < len(grid):
        say(f"Stopped after {max_runs} run(s): {len(grid) - len(all_runs)} left. Run again to continue.", flush=True)
        return Comparison([], [], all_runs, out, complete=False)
    chosen = []
    for method in methods:
        for seed in range(seeds):
            runs = [results[(method.name, seed, lr)] for lr in lrs]
            finished = [r for r in runs if not r.diverged]
            # The first learning rate of the grid on a tie; when every one diverged, the first stands for the seed.
            best = max(finished, key=lambda r: r.val_acc) if finished else runs[0]
            chosen.append(
                replace(
                    best,
                    grid={r.lr: r.val_acc for r in runs},
                    grid_time=sum(r.fit_time for r in runs),
                    grid_diverged=len(runs) - len(finished),
                )
            )
    rows = summarize(chosen)
    if verbose:
        say(
            "\nTest accuracy of the checkpoint and learning rate with the best validation accuracy, mean ± std over "
            "seeds:\n"
        )
        say(format_table(rows))
        say(f"\n{WALL_TIME_NOTE}")
        if not any(r.modality_acc for r in rows) and any(not math.isnan(r.test_acc[0]) for r in rows):
            say("The module's forward returns no `unimodal_logits`: per-modality accuracy is not reported.")
    if _rank_zero():
        config = {"format": _FORMAT, **setup.config, "lrs": list(lrs), "seeds": seeds}
        files = write_results(rows, chosen, out, config, all_runs)
        png = plot_summary(rows, out / "summary.png", title=f"mmbalance compare: {setup.name}")
        say(
            f"\nResults: {', '.join(str(f) for f in files)}\nSummary figure: {png}\nTensorBoard: tensorboard --logdir "
            f"{out}"
        )
    return Comparison(rows, chosen, all_runs, out)


def check_grid(methods: Sequence[Any], lrs: Sequence[float], seeds: int, epochs: int) -> None:
    """Check the grid of a comparison.

    Raises:
        CompareError: no method or a repeated one, no learning rate or one <= 0, ``seeds`` or ``epochs`` < 1.
    """
    if not methods:
        raise CompareError("`methods` must name at least one method.")
    if len(set(methods)) != len(methods):
        raise CompareError(f"`methods` must not repeat a name, got {list(methods)}.")
    if not lrs:
        raise CompareError("`lrs` must hold at least one learning rate.")
    if any(isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0 for lr in lrs):
        raise CompareError(f"Every learning rate must be > 0, got {list(lrs)}.")
    for name, value in (("seeds", seeds), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CompareError(f"`{name}` must be an int >= 1, got {value!r}.")


def trainer_arguments(trainer_args: Mapping[str, Any] | None, epochs: int, reference: bool) -> dict[str, Any]:
    """The Trainer arguments of every run but the callbacks: the comparison's defaults, then the user's.

    Args:
        trainer_args: the user's Trainer arguments; None values count as not given, ``callbacks`` is left out.
        epochs: the run length.
        reference: whether the model is the reference one (then one CPU process is the default).

    Raises:
        CompareError: ``max_epochs`` differs from ``epochs``, ``enable_checkpointing`` is off, the strategy runs the
            fit in processes it starts (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``), or ``logger`` is neither True
            nor False.
    """
    args = {k: v for k, v in (trainer_args or {}).items() if v is not None and k != "callbacks"}
    if args.pop("max_epochs", epochs) != epochs:
        raise CompareError(f"Set the run length with `epochs` (`--epochs`), not `max_epochs` ({trainer_args}).")
    if args.pop("enable_checkpointing", True) is not True:
        raise CompareError("`enable_checkpointing` must stay on: each run keeps its best-validation checkpoint.")
    if isinstance(args.get("strategy"), str) and args["strategy"].startswith(_IN_OTHER_PROCESSES):
        raise CompareError(_other_processes(args["strategy"]))
    if args.get("logger", True) not in (True, False):
        raise CompareError(
            f"`logger` must be True (one TensorBoard run per method, learning rate and seed) or False, got "
            f"{args['logger']!r}."
        )
    return {**(_REFERENCE_TRAINER if reference else {}), **args}


def describe_run_setup(
    model: Callable[..., Any],
    model_args: Mapping[str, Any],
    lr_name: str,
    data: Any,
    trainer: Mapping[str, Any],
    callbacks: Any,
    epochs: int,
    probe: bool = False,
) -> dict[str, Any]:
    """The JSON description of a comparison's runs that is hashed into each run's result (learning rate excluded).

    ``data`` is a built-in name, a data module class with its init arguments in ``{"class": cls, "init_args": ...}``,
    or any other description (an instance or a parsed configuration).
    """
    if isinstance(data, str):
        data = {"builtin": data}
    elif isinstance(data, dict) and isinstance(data.get("class"), type):
        data = {"class_path": _jsonable(data["class"]), "init_args": _with_defaults(data["class"], data["init_args"])}
    full = _with_defaults(pl.Trainer, {**trainer, "callbacks": callbacks})
    model_init = {k: v for k, v in _with_defaults(model, model_args).items() if k != lr_name}
    return {
        "model": {"class_path": _jsonable(model), "init_args": _jsonable(model_init)},
        "data": _jsonable(data),
        "trainer": {k: _jsonable(v) for k, v in full.items() if k not in _NOT_HASHED},
        "epochs": epochs,
        "probe": probe,
    }


def reference_model(dm: pl.LightningDataModule, lr: float, model_args: Mapping[str, Any]) -> LateFusionClassifier:
    """The reference :class:`~lightning_mmbalance.models.LateFusionClassifier`, with the data module's shapes.

    Raises:
        CompareError: the data module has no ``input_shapes`` or ``num_classes``.
    """
    if not hasattr(dm, "input_shapes") or not hasattr(dm, "num_classes"):
        raise CompareError(
            f"Without a model, the reference LateFusionClassifier is trained; it takes `input_shapes` and "
            f"`num_classes` from the data module, which `{type(dm).__name__}` lacks. Give your model (`--model`)."
        )
    return LateFusionClassifier(dm.input_shapes, dm.num_classes, **{**model_args, "lr": lr})


def compare(
    model: type[pl.LightningModule] | None = None,
    data: str | pl.LightningDataModule | type[pl.LightningDataModule] = "cg-digits",
    *,
    methods: Sequence[str] = METHODS,
    lrs: Sequence[float] = DEFAULT_LRS,
    seeds: int = 2,
    epochs: int = 10,
    output: str | Path = "mmbalance_runs",
    model_args: Mapping[str, Any] | None = None,
    data_args: Mapping[str, Any] | None = None,
    method_args: Mapping[str, Mapping[str, Any]] | None = None,
    trainer_args: Mapping[str, Any] | None = None,
    lr_arg: str | None = None,
    max_runs: int | None = None,
    probe: bool = False,
    verbose: bool = True,
) -> Comparison:
    """Compare balancing methods on a model and data module, each method at its own validation-chosen learning rate.

    Every (method, learning rate, seed) is trained for ``epochs`` epochs; per method and seed, the learning rate whose
    best checkpoint has the best validation accuracy of the fused prediction is chosen, and that checkpoint's test
    accuracy (fused and per modality) is reported as mean ± std over seeds. The test split is never used for a choice.
    Finished runs in ``output`` are read back, not trained again; a changed configuration is refused.

    Args:
        model: a LightningModule class whose ``forward(batch)`` returns a
            :class:`~lightning_mmbalance.MultimodalOutput` and that takes the learning rate as an init argument (see
            ``lr_arg``); None uses the reference :class:`~lightning_mmbalance.models.LateFusionClassifier`, which
            takes ``input_shapes`` and ``num_classes`` from the data module.
        data: a LightningDataModule instance or class (with ``train``/``val``/``test`` loaders), or the name of a
            built-in data set (``"cg-digits"``, ``"synthetic"``, ``"synthetic3"``, ``"parts"``). An instance is
            shared by all runs and described in the configuration hash by its ``hparams``.
        methods: method names, see :func:`resolve_method`.
        lrs: the learning-rate grid.
        seeds: the number of seeds (0, 1, ...), int >= 1.
        epochs: training epochs of every run, int >= 1.
        output: the output folder.
        model_args: the model's init arguments (not the learning rate).
        data_args: the data module class's init arguments (for a built-in data set: ``batch_size``).
        method_args: method name -> init arguments, e.g. ``{"OGMGE": {"alpha": 0.8}}``.
        trainer_args: Trainer arguments (``accelerator``, ``devices``, ``strategy``, ``precision``, ``callbacks``...);
            the callbacks are copied for every run, and the method's callbacks are added to them.
        lr_arg: the model's init argument that takes the learning rate; None looks for ``lr``, then ``learning_rate``.
        max_runs: train at most this many runs, then return (run again to continue); None trains every run.
        probe: also report each encoder's linear-probe test accuracy.
        verbose: print progress and the table.

    Returns:
        The :class:`Comparison`; ``str()`` of it is the table.

    Raises:
        CompareError: an empty or repeated method list, an empty grid, a learning rate <= 0, an unknown method or data
            set, a model without a learning-rate argument, a data module without a validation or test loader, Trainer
            arguments that the comparison sets itself, or runs in ``output`` made with another configuration.

    Example::

        from lightning_mmbalance.compare import compare

        result = compare(AudioVisual, CremaD(root="data/crema-d"), methods=["baseline", "OGMGE", "MMPareto"],
                         lrs=[1e-3, 3e-3], seeds=3, epochs=30, trainer_args={"accelerator": "gpu"},
                         output="runs/cremad")
        print(result)
    """
    check_grid(methods, lrs, seeds, epochs)
    if max_runs is not None and (isinstance(max_runs, bool) or not isinstance(max_runs, int) or max_runs < 1):
        raise CompareError(f"`max_runs` must be None or an int >= 1, got {max_runs!r}.")
    if isinstance(data, str) and data not in DATASETS:
        raise CompareError(f"Unknown dataset {data!r}; available: {DATASETS}.")
    model_args, data_args = dict(model_args or {}), dict(data_args or {})
    trainer = trainer_arguments(trainer_args, epochs, reference=model is None)
    callbacks = list((trainer_args or {}).get("callbacks") or [])
    model_cls = model or LateFusionClassifier
    lr_name = resolve_lr_argument(model_cls, lr_arg)
    # Adam-type optimizers undo a constant gradient scale: the presets' scaling methods then scale the update instead.
    modulate = "update" if model is None and model_args.get("optimizer", "sgd") != "sgd" else "gradient"
    resolved = [resolve_method(m, (method_args or {}).get(m), modulate) for m in methods]

    def build(lr: float) -> Built:
        dm: pl.LightningDataModule
        if isinstance(data, str):
            dm = make_datamodule(data, **data_args)
        else:
            dm = data(**data_args) if isinstance(data, type) else data
        built = reference_model(dm, lr, model_args) if model is None else model(**{**model_args, lr_name: lr})
        return built, dm, copy.deepcopy(callbacks)

    described = {"class": data, "init_args": data_args} if isinstance(data, type) else data
    if isinstance(data, str) and data_args:
        described = {"builtin": data, "init_args": data_args}
    name = data if isinstance(data, str) else data.__name__ if isinstance(data, type) else type(data).__name__
    config = describe_run_setup(model_cls, model_args, lr_name, described, trainer, callbacks, epochs, probe)
    setup = Setup(build, trainer, config, name, epochs, probe)
    return run_comparison(setup, resolved, lrs, seeds, output, lr_name, max_runs, verbose)
