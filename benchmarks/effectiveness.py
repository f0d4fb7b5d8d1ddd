"""Effectiveness of every method on the built-in data, with model selection on the validation split only.

For each data set (CG-Digits, two-modality synthetic, three-modality synthetic) and each method (the joint-loss
baseline, the uniform baseline L_f + sum L_m, and every balancing method at its documented defaults), train the
reference model over several seeds, keep the checkpoint with the best validation accuracy, and report on the test
split: fused accuracy, per-modality accuracy (unimodal logits) and per-modality linear-probe accuracy (a logistic
regression fitted on the training features of the selected checkpoint), as mean +- std over seeds.

This is the code path of ``mmbalance compare`` (``lightning_mmbalance.experiment.run_one``).

    python benchmarks/effectiveness.py                       # all data sets, all methods, 5 seeds
    python benchmarks/effectiveness.py --data cg-digits --seeds 3 --epochs 15
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

from lightning_mmbalance.experiment import DATASETS, METHODS, run_one, summarize


def markdown(rows, modalities) -> str:
    head = [
        "method",
        "fused acc",
        *(f"{m} acc" for m in modalities),
        *(f"{m} probe" for m in modalities),
        "step",
        "fit",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.method, f"{100 * r.test_acc[0]:.1f} ± {100 * r.test_acc[1]:.1f}"]
        cells += [f"{100 * r.modality_acc[m][0]:.1f} ± {100 * r.modality_acc[m][1]:.1f}" for m in modalities]
        cells += [f"{100 * r.probe_acc[m][0]:.1f} ± {100 * r.probe_acc[m][1]:.1f}" for m in modalities]
        cells += [f"{r.relative_step_time:.2f}x", f"{r.relative_fit_time:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--output", type=Path, default=Path("benchmark_runs"))
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(
        f"torch {torch.__version__}, {platform.machine()} {platform.processor()}, {torch.get_num_threads()} threads; "
        f"{args.seeds} seeds, {args.epochs} epochs\n"
    )
    report = {}
    for dataset in args.data:
        results = []
        start = time.perf_counter()
        for method in args.methods:
            for seed in range(args.seeds):
                results.append(
                    run_one(method, seed, dataset=dataset, max_epochs=args.epochs, out_dir=args.output, probe=True)
                )
                print(f"  {dataset} {method} seed {seed}: test {100 * results[-1].test_acc:.1f}%", flush=True)
        rows = summarize(results)
        modalities = list(rows[0].modality_acc)
        print(f"\n### {dataset} ({time.perf_counter() - start:.0f} s)\n\n{markdown(rows, modalities)}\n", flush=True)
        report[dataset] = [asdict(r) for r in results]
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "effectiveness.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
