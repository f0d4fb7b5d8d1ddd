"""The ``mmbalance`` command.

- ``mmbalance compare``: train a LightningModule on a LightningDataModule (``--model`` / ``--data`` class paths, or
  the reference model on built-in data) without balancing and with each method, each at the learning rate of a grid
  with the best validation accuracy, and print fused and per-modality test accuracy (mean ± std over seeds) with the
  chosen learning rates; the engine is :mod:`lightning_mmbalance.compare`.
- ``mmbalance fit|validate|test``: LightningCLI over the reference model and the built-in data modules, so any
  callback can be added from the command line or a YAML config, e.g.
  ``mmbalance fit --data CGDigitsDataModule --trainer.callbacks+=lightning_mmbalance.OGMGE``.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import sys
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from jsonargparse import ActionConfigFile
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

__all__ = ["MMBalanceCLI", "main"]

_CLI_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class MMBalanceCLI(LightningCLI):
    """LightningCLI with the data module's input shapes and class count linked into the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link ``data.input_shapes`` and ``data.num_classes`` to the model."""
        parser.link_arguments("data.input_shapes", "model.input_shapes", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def _compare_parser() -> LightningArgumentParser:
    from lightning_mmbalance.experiment import DATASETS, DEFAULT_LRS, METHODS

    parser = LightningArgumentParser(
        prog="mmbalance compare",
        description="Compare balancing methods on a LightningModule and LightningDataModule (yours, or the reference "
        "model on built-in data): every method at every learning rate of --lrs and every seed; per method and seed, "
        "the learning rate with the best validation accuracy of the fused prediction is chosen and its test accuracy "
        "(fused and per modality) reported. Finished runs in --output are read back, not trained again. "
        "See docs/compare.md.",
        default_env=False,
    )
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="a YAML file with any of the options below")
    parser.add_subclass_arguments(
        pl.LightningModule,
        "model",
        required=False,
        help="your LightningModule (class path); its forward returns a MultimodalOutput and it takes the learning "
        "rate as an init argument. Default: the reference LateFusionClassifier, linked to the data.",
    )
    parser.add_argument(
        "--data",
        type=Literal[DATASETS] | pl.LightningDataModule,
        default="cg-digits",
        help=f"your LightningDataModule (class path, with train, val and test loaders) or a built-in data set "
        f"({', '.join(DATASETS)}); default cg-digits",
    )
    parser.add_argument(
        "--methods",
        type=str | dict[str, dict[str, Any]],
        nargs="+",
        default=list(METHODS),
        help="baseline, callback classes of lightning_mmbalance (OGMGE, MMPareto, ARL, UnimodalLosses...; in YAML "
        f"with init args: `- OGMGE: {{alpha: 0.8}}`) or built-in presets ({', '.join(METHODS)}); default: the presets",
    )
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=list(DEFAULT_LRS),
        help=f"learning-rate grid; default {' '.join(f'{lr:g}' for lr in DEFAULT_LRS)}",
    )
    parser.add_argument("--seeds", type=int, default=2, help="number of seeds (0, 1, ...); default 2")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per run (max_epochs); default 10")
    parser.add_argument("--output", type=str, default="mmbalance_runs", help="output folder; default mmbalance_runs")
    parser.add_argument(
        "--lr-arg",
        type=str | None,
        default=None,
        help="the model's init argument that takes the learning rate; default: lr, else learning_rate",
    )
    parser.add_argument(
        "--max-runs", type=int | None, default=None, help="train at most this many runs, then stop (run again to go on)"
    )
    parser.add_lightning_class_args(pl.Trainer, "trainer")
    return parser


def _changed(values: dict[str, Any], target: Any) -> dict[str, Any]:
    """The ``values`` that differ from the defaults of ``target``'s signature."""
    defaults = {p.name: p.default for p in inspect.signature(target).parameters.values()}
    return {k: v for k, v in values.items() if k in defaults and v != defaults[k]}


def compare(argv: Sequence[str]) -> int:
    """Run ``mmbalance compare``; returns the exit code."""
    parser = _compare_parser()
    cfg = parser.parse_args(argv)
    if cfg.seeds < 1 or cfg.epochs < 1:
        print("mmbalance compare: --seeds and --epochs must be >= 1", file=sys.stderr)
        return 2
    if any(not lr > 0 for lr in cfg.lrs):
        print(f"mmbalance compare: every --lrs value must be > 0, got {cfg.lrs}", file=sys.stderr)
        return 2
    import logging
    import warnings

    from lightning_mmbalance import compare as engine
    from lightning_mmbalance.experiment import make_datamodule
    from lightning_mmbalance.models import LateFusionClassifier

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning\.")
    try:
        if any(not isinstance(m, str) and len(m) != 1 for m in cfg.methods):
            raise engine.CompareError(f"A method with arguments is one `NAME: {{args}}` mapping, got {cfg.methods}.")
        names = [m if isinstance(m, str) else next(iter(m)) for m in cfg.methods]
        method_args = {name: m[name] for name, m in zip(names, cfg.methods, strict=True) if not isinstance(m, str)}
        engine.check_grid(names, cfg.lrs, cfg.seeds, cfg.epochs)
        reference = cfg.model is None
        trainer = engine.trainer_arguments(_changed(cfg.trainer.as_dict(), pl.Trainer), cfg.epochs, reference)
        module, _, class_name = ("" if reference else cfg.model.class_path).rpartition(".")
        model_cls = LateFusionClassifier if reference else getattr(importlib.import_module(module), class_name)
        lr_name = engine.resolve_lr_argument(model_cls, cfg.lr_arg)
        model_args = {} if reference else {k: v for k, v in cfg.model.init_args.as_dict().items() if k != lr_name}
        methods = [engine.resolve_method(name, method_args.get(name)) for name in names]
        callbacks = [c.as_dict() for c in cfg.trainer.callbacks or []]
        config = engine.describe_run_setup(model_cls, model_args, lr_name, cfg.data, trainer, callbacks, cfg.epochs)

        def build(lr: float) -> engine.Built:
            run = copy.deepcopy(cfg)
            if not reference:
                setattr(run.model.init_args, lr_name, lr)
            init = parser.instantiate(run)
            dm = make_datamodule(init.data) if isinstance(init.data, str) else init.data
            model = engine.reference_model(dm, lr, {}) if reference else init.model
            return model, dm, list(init.trainer.callbacks or [])

        name = cfg.data if isinstance(cfg.data, str) else cfg.data.class_path.rsplit(".", 1)[-1]
        setup = engine.Setup(build, trainer, config, name, cfg.epochs)
        engine.run_comparison(setup, methods, cfg.lrs, cfg.seeds, cfg.output, lr_name, cfg.max_runs)
    except engine.CompareError as error:
        print(f"mmbalance compare: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmbalance`` console script."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return compare(argv[1:])
    if argv and argv[0] in _CLI_SUBCOMMANDS:
        from lightning_mmbalance.data import MultimodalDataModule
        from lightning_mmbalance.models import LateFusionClassifier

        MMBalanceCLI(
            LateFusionClassifier,
            MultimodalDataModule,
            subclass_mode_data=True,
            args=None if from_command_line else argv,  # LightningCLI warns when given both args and sys.argv
            save_config_kwargs={"overwrite": True},
        )
        return 0
    print(
        "usage: mmbalance {compare,fit,validate,test,predict} ...\n\n"
        "  compare   compare the balancing methods on your model and data, or on built-in data (--help)\n"
        "  fit       train the reference model with LightningCLI (mmbalance fit --help)\n"
        "  validate  evaluate a checkpoint on the validation split (LightningCLI)\n"
        "  test      evaluate a checkpoint on the test split (LightningCLI)\n"
        "  predict   run the model on the prediction data (LightningCLI)",
        file=sys.stderr if argv else sys.stdout,
    )
    return 0 if not argv or argv[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    raise SystemExit(main())
