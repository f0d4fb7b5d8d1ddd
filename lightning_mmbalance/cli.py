"""The ``mmbalance`` command.

- ``mmbalance compare``: train the reference model on built-in data without balancing and with each method, each at
  the learning rate of a grid with the best validation accuracy, and print fused and per-modality test accuracy
  (mean +- std over seeds) with the chosen learning rates.
- ``mmbalance fit|validate|test``: LightningCLI over the reference model and the built-in data modules, so any
  callback can be added from the command line or a YAML config, e.g.
  ``mmbalance fit --data CGDigitsDataModule --trainer.callbacks+=lightning_mmbalance.OGMGE``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

__all__ = ["MMBalanceCLI", "main"]

_CLI_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class MMBalanceCLI(LightningCLI):
    """LightningCLI with the data module's input shapes and class count linked into the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link ``data.input_shapes`` and ``data.num_classes`` to the model."""
        parser.link_arguments("data.input_shapes", "model.input_shapes", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def _compare_parser() -> argparse.ArgumentParser:
    from lightning_mmbalance.experiment import DATASETS, DEFAULT_LRS, METHODS

    parser = argparse.ArgumentParser(
        prog="mmbalance compare",
        description="Train the reference late-fusion model on built-in data without balancing and with each "
        "balancing method, each at the learning rate of --lrs with the best validation accuracy (per method and "
        "seed); report test accuracy. Times are not compared here: see benchmarks/overhead.py.",
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD")
    parser.add_argument(
        "--lrs",
        nargs="+",
        type=float,
        default=list(DEFAULT_LRS),
        metavar="LR",
        help=f"learning-rate grid (SGD, momentum 0.9); default {' '.join(f'{lr:g}' for lr in DEFAULT_LRS)}",
    )
    parser.add_argument("--seeds", type=int, default=2, help="number of seeds (0, 1, ...); default 2")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per run; default 10")
    parser.add_argument("--data", choices=DATASETS, default="cg-digits", help="built-in data set; default cg-digits")
    parser.add_argument("--output", type=Path, default=Path("mmbalance_runs"), help="output folder")
    return parser


def compare(argv: Sequence[str]) -> int:
    """Run ``mmbalance compare``; returns the exit code."""
    args = _compare_parser().parse_args(argv)
    if args.seeds < 1 or args.epochs < 1:
        print("mmbalance compare: --seeds and --epochs must be >= 1", file=sys.stderr)
        return 2
    if any(not lr > 0 for lr in args.lrs):
        print(f"mmbalance compare: every --lrs value must be > 0, got {args.lrs}", file=sys.stderr)
        return 2
    import logging
    import warnings

    from lightning_mmbalance.experiment import format_table, plot_summary, run_grid, summarize

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"mmbalance compare: {args.data}, methods {', '.join(args.methods)}, {args.seeds} seed(s), "
        f"{args.epochs} epochs, learning rates {', '.join(f'{lr:g}' for lr in args.lrs)}; output in {out.resolve()}",
        flush=True,
    )
    results = []
    total = len(args.methods) * args.seeds
    for i, (method, seed) in enumerate(((m, s) for m in args.methods for s in range(args.seeds)), start=1):
        start = time.perf_counter()
        result = run_grid(method, seed, args.lrs, dataset=args.data, max_epochs=args.epochs, out_dir=out)
        results.append(result)
        print(
            f"[{i:>2}/{total}] {method:<17} seed {seed}: lr {result.lr:g} (val acc {100 * result.val_acc:.1f}%), "
            f"test acc {100 * result.test_acc:5.1f}% ({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
        for warning in result.warnings:
            print(f"    step-size warning: {warning}", flush=True)
    rows = summarize(results)
    table = format_table(rows)
    print("\nTest accuracy (checkpoint and learning rate with the best validation accuracy), mean ± std over seeds:\n")
    print(table)
    print("\nPer-step cost of each method: python benchmarks/overhead.py (the README's overhead table).")
    png = plot_summary(rows, out / "summary.png", title=f"mmbalance compare: {args.data}")
    (out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    (out / "summary.txt").write_text(table + "\n")
    print(f"\nSummary figure: {png.resolve()}\nTensorBoard logs: tensorboard --logdir {out.resolve()}")
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
        "  compare   compare the balancing methods on built-in data (mmbalance compare --help)\n"
        "  fit       train the reference model with LightningCLI (mmbalance fit --help)\n"
        "  validate  evaluate a checkpoint on the validation split (LightningCLI)\n"
        "  test      evaluate a checkpoint on the test split (LightningCLI)\n"
        "  predict   run the model on the prediction data (LightningCLI)",
        file=sys.stderr if argv else sys.stdout,
    )
    return 0 if not argv or argv[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    raise SystemExit(main())
