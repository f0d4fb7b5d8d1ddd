"""The built-in configuration of ``mmbalance compare`` and the results it reports.

The built-in data sets and method presets (:data:`DATASETS`, :data:`METHODS`: each method at its documented
defaults, with epoch schedules scaled to the run length), the result of one run (:class:`RunResult`), the mean ± std
rows over seeds (:func:`summarize`) and their table, files and figure. The comparison itself, on the built-in data or
on any LightningModule and DataModule, is :func:`lightning_mmbalance.compare.compare`.

The wall times reported are the total time of each method's runs, made one after another on one machine: they are
no overhead measurement. The per-step overhead of every method is measured by ``benchmarks/overhead.py``
(interleaved rounds, medians) and the epoch-level costs by ``benchmarks/epoch_costs.py``.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_mmbalance.callbacks import (
    AGM,
    ARL,
    OGMGE,
    OPM,
    DiagnosingRelearning,
    GradientBlending,
    InfoReg,
    MMPareto,
    UnimodalLosses,
)
from lightning_mmbalance.data import CGDigitsDataModule, MultimodalDataModule, PartsDataModule, SyntheticDataModule

__all__ = [
    "DATASETS",
    "DEFAULT_LRS",
    "METHODS",
    "RunResult",
    "Summary",
    "format_duration",
    "format_lrs",
    "format_table",
    "make_datamodule",
    "method_callbacks",
    "plot_summary",
    "summarize",
    "write_results",
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
    "inforeg": lambda epochs, mode: [InfoReg(window_size=_scaled(0.2, epochs), modulate=mode)],  # official: 10 of 50
    "agm": lambda epochs, mode: [AGM(modulate=mode)],  # the authors modulate every epoch (CREMA-D alpha 1.5)
    "opm": lambda epochs, mode: [OPM(modulation_starts=_scaled(0.06, epochs))],  # official warm-up: epochs 0-5 of 100
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

    ``val_acc`` is that checkpoint's validation accuracy (of the fused prediction), which the comparison compares
    across learning rates; ``grid`` holds every learning rate's ``val_acc`` when the run was chosen from a grid, and
    ``grid_time`` the total ``fit_time`` of those runs. ``modality_acc`` is empty for a module whose output has no
    unimodal logits. ``fit_time`` is the wall time of ``Trainer.fit`` and of the test (not comparable across runs made
    one after another on a shared machine). ``warnings`` are the step-size warnings the callbacks raised during the
    fit, ``step_ratio`` the median over the logged steps of each modality's ``step_ratio`` (how much the method
    enlarged that encoder's step; empty for methods that do not scale). ``diverged`` is the message of the
    :class:`~lightning_mmbalance.DivergenceError` that stopped the run (empty when it finished): such a run has NaN
    accuracies and ``best_epoch`` -1, and is never chosen. ``grid_diverged`` counts the runs of ``grid`` that diverged.

    Example::

        RunResult(method="OGMGE", seed=0, test_acc=0.71, modality_acc={"audio": 0.6, "visual": 0.4}, val_acc=0.7,
                  best_epoch=12, log_dir="runs/cremad/CremaD/OGMGE/lr0.001-seed0", lr=0.001)
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
    grid_time: float = float("nan")
    diverged: str = ""
    grid_diverged: int = 0


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

    @property
    def wall_time(self) -> float:
        """Total wall time in seconds of all the method's runs (every learning rate and seed); NaN when unknown."""
        return sum(r.grid_time for r in self.runs)

    @property
    def diverged(self) -> tuple[int, int]:
        """How many of the method's runs (every learning rate and seed) diverged, and how many there were."""
        return sum(r.grid_diverged for r in self.runs), sum(len(r.grid) or 1 for r in self.runs)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation; NaN for no values (every run of the method diverged)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: Sequence[RunResult]) -> list[Summary]:
    """Group runs by method (in :data:`METHODS` order): mean +- std over seeds, and the chosen learning rates.

    A seed whose every learning rate diverged takes no part in the accuracies; its chosen learning rate is NaN.
    """
    by_method: dict[str, list[RunResult]] = {}
    for r in results:
        by_method.setdefault(r.method, []).append(r)
    rows = []
    for method in sorted(by_method, key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS)):
        runs = sorted(by_method[method], key=lambda r: r.seed)
        finished = [r for r in runs if not r.diverged]
        first = finished[0] if finished else runs[0]
        rows.append(
            Summary(
                method=method,
                test_acc=_mean_std([r.test_acc for r in finished]),
                modality_acc={m: _mean_std([r.modality_acc[m] for r in finished]) for m in first.modality_acc},
                lrs=[math.nan if r.diverged else r.lr for r in runs],
                probe_acc={m: _mean_std([r.probe_acc[m] for r in finished]) for m in first.probe_acc},
                runs=runs,
            )
        )
    return rows


def format_lrs(lrs: Sequence[float]) -> str:
    """The chosen learning rates, one per seed: ``"0.01 (all)"`` when they agree, else ``"0.01, diverged"``.

    NaN stands for a seed whose every learning rate diverged.
    """
    names = ["diverged" if math.isnan(lr) else f"{lr:g}" for lr in lrs]
    if len(set(names)) == 1 and len(names) > 1:
        return f"{names[0]} (all)"
    return ", ".join(names)


WALL_TIME_NOTE = (
    "* wall time: total of the method's runs (every learning rate and seed), made one after another on this machine; "
    "not an overhead measurement (see benchmarks/overhead.py)."
)
"""The footnote of the tables' wall-time column."""

DIVERGED_NOTE = (
    "** diverged: runs stopped by a DivergenceError (NaN or infinite values), of all the method's runs; their "
    'validation accuracy took part in no choice. "all diverged": every learning rate of every seed diverged.'
)
"""The footnote of the tables' diverged column (shown when a run diverged)."""


def format_duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``; ``"n/a"`` for NaN."""
    if math.isnan(seconds):
        return "n/a"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _modalities(rows: Sequence[Summary]) -> list[str]:
    """The modalities of the per-modality accuracies (a method whose every run diverged has none)."""
    return next((list(r.modality_acc) for r in rows if r.modality_acc), [])


def _any_diverged(rows: Sequence[Summary]) -> bool:
    return any(r.diverged[0] for r in rows)


def _table(rows: Sequence[Summary]) -> list[list[str]]:
    """Header and one line per method: accuracies as mean ± std in %, chosen lrs, seeds, wall time (and divergences)."""
    modalities = _modalities(rows)
    diverged = _any_diverged(rows)

    def percent(stat: tuple[float, float]) -> str:
        return "all diverged" if math.isnan(stat[0]) else f"{100 * stat[0]:.1f} ± {100 * stat[1]:.1f}"

    header = ["method", "fused acc", *(f"{m} acc" for m in modalities), "lr per seed", "seeds", "wall time*"]
    return [header + (["diverged**"] if diverged else [])] + [
        [
            r.method,
            percent(r.test_acc),
            *(percent(r.modality_acc.get(m, (math.nan, math.nan))) for m in modalities),
            format_lrs(r.lrs),
            str(len(r.runs)),
            format_duration(r.wall_time),
            *(["{} of {}".format(*r.diverged)] if diverged else []),
        ]
        for r in rows
    ]


def format_table(rows: Sequence[Summary]) -> str:
    """A fixed-width text table: fused and per-modality test accuracy (mean ± std, %), chosen lrs, wall time."""
    lines = _table(rows)
    header = lines[0]
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text + ([f"\n{DIVERGED_NOTE}"] if _any_diverged(rows) else []))


def write_results(
    rows: Sequence[Summary],
    runs: Sequence[RunResult],
    output: str | Path,
    config: dict[str, Any],
    all_runs: Sequence[RunResult] = (),
) -> list[Path]:
    """Write ``results.md``, ``results.csv`` and ``results.json`` to ``output``; returns their paths.

    ``results.md`` holds the table (accuracies in %) with the protocol; ``results.csv`` one line per method with
    accuracies as fractions (``<head>_acc_mean``, ``<head>_acc_std``), the chosen learning rates, the wall time in
    seconds and the number of diverged runs; ``results.json`` the configuration, the same summary, every chosen run
    (:class:`RunResult`) in ``runs`` and every run of the grid, diverged ones included, in ``all_runs``.
    """
    out = Path(output)
    lines = _table(rows)
    seeds = config.get("seeds", "?")
    lrs = ", ".join(f"{lr:g}" for lr in config.get("lrs", []))
    markdown = [
        f"Test accuracy (%) of the checkpoint and learning rate with the best validation accuracy of the fused "
        f"prediction, mean ± std over seeds ({seeds}); learning rates tried: {lrs}; "
        f"epochs: {config.get('epochs', '?')}. "
        "The test split took part in no choice.",
        "",
        "| " + " | ".join(lines[0]) + " |",
        "|" + "---|" * len(lines[0]),
        *("| " + " | ".join(line) + " |" for line in lines[1:]),
        "",
        "\\" + WALL_TIME_NOTE,
        *(["", "\\" + DIVERGED_NOTE.replace("*", "\\*")] if _any_diverged(rows) else []),
    ]
    (out / "results.md").write_text("\n".join(markdown) + "\n")
    heads = ["fused", *_modalities(rows)]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "method",
                *(f"{h}_acc_{s}" for h in heads for s in ("mean", "std")),
                "lrs",
                "seeds",
                "wall_time_s",
                "diverged_runs",
            ]
        )
        for r in rows:
            stats = [r.test_acc if h == "fused" else r.modality_acc.get(h, (math.nan, math.nan)) for h in heads]
            lrs_chosen = " ".join(f"{lr:g}" for lr in r.lrs)
            row = [r.method, *(v for stat in stats for v in stat), lrs_chosen, len(r.runs), r.wall_time, r.diverged[0]]
            writer.writerow(row)
    summary = [
        {**{k: v for k, v in asdict(r).items() if k != "runs"}, "seeds": len(r.runs), "wall_time_s": r.wall_time}
        for r in rows
    ]
    payload = {
        "config": config,
        "wall_time_note": WALL_TIME_NOTE,
        "summary": summary,
        "runs": [asdict(r) for r in runs],
        "all_runs": [asdict(r) for r in all_runs],
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    return [out / "results.md", out / "results.csv", out / "results.json"]


def plot_summary(rows: Sequence[Summary], path: str | Path, title: str = "") -> Path:
    """A bar chart of fused and per-modality test accuracy per method (mean +- std), saved as PNG."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are left alone

    groups = ["fused", *_modalities(rows)]
    width = 0.8 / len(groups)
    fig = Figure(figsize=(1.6 + 1.3 * len(rows), 3.6))
    ax = fig.subplots()
    for i, group in enumerate(groups):
        stats = [r.test_acc if group == "fused" else r.modality_acc.get(group, (math.nan, math.nan)) for r in rows]
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
