"""Effectiveness of every method on the built-in data, with model selection on the validation split only.

For each data set and each method (the joint-loss baseline, the uniform baseline L_f + sum L_m, and every balancing
method at its documented defaults), train the reference model over several seeds at every learning rate of a grid,
keep, per method and seed, the learning rate and checkpoint with the best validation accuracy, and report on the test
split: fused accuracy, per-modality accuracy (unimodal logits) and per-modality linear-probe accuracy (a logistic
regression fitted on the training features of the selected checkpoint), as mean +- std over seeds, with the chosen
learning rates and the number of step-size warnings the runs raised.

This is the code path of ``mmbalance compare`` (``lightning_mmbalance.compare.compare``): finished runs in
``--output`` are read back, so an interrupted benchmark goes on where it stopped.

    python benchmarks/effectiveness.py                       # all data sets, all methods, 5 seeds
    python benchmarks/effectiveness.py --data cg-digits --seeds 3 --epochs 15 --lrs 0.01
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from lightning_mmbalance.compare import compare
from lightning_mmbalance.experiment import DATASETS, METHODS, format_lrs


def markdown(rows, modalities) -> str:
    head = [
        "method",
        "fused acc",
        *(f"{m} acc" for m in modalities),
        *(f"{m} probe" for m in modalities),
        "lr per seed",
        "warnings",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.method, f"{100 * r.test_acc[0]:.1f} ± {100 * r.test_acc[1]:.1f}"]
        cells += [f"{100 * r.modality_acc[m][0]:.1f} ± {100 * r.modality_acc[m][1]:.1f}" for m in modalities]
        cells += [f"{100 * r.probe_acc[m][0]:.1f} ± {100 * r.probe_acc[m][1]:.1f}" for m in modalities]
        cells += [format_lrs(r.lrs), str(r.warnings)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.003, 0.01, 0.03, 0.1])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--optimizer",
        choices=("sgd", "adam", "adamw"),
        default="sgd",
        help="the reference model's optimizer; with Adam the scaling methods use modulate='update'",
    )
    parser.add_argument("--output", type=Path, default=Path("benchmark_runs"))
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(
        f"torch {torch.__version__}, {platform.machine()} {platform.processor()}, {torch.get_num_threads()} threads; "
        f"{args.seeds} seeds, {args.epochs} epochs, {args.optimizer}, learning rates {args.lrs}\n"
    )
    report = {}
    for dataset in args.data:
        start = time.perf_counter()
        result = compare(
            data=dataset,
            methods=args.methods,
            lrs=args.lrs,
            seeds=args.seeds,
            epochs=args.epochs,
            output=args.output / dataset,
            model_args={"optimizer": args.optimizer},
            probe=True,
        )
        modalities = list(result.rows[0].modality_acc)
        print(
            f"\n### {dataset} ({time.perf_counter() - start:.0f} s)\n\n{markdown(result.rows, modalities)}\n",
            flush=True,
        )
        report[dataset] = [asdict(r) for r in result.runs]
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "effectiveness.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
