"""Figures, drawn with matplotlib's object API (no pyplot: the caller's backend and open figures are left alone)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["plot_history"]


def plot_history(history: Mapping[str, Sequence[tuple[int, float]]], path: str | Path) -> Path:
    """Per-modality accuracy curves and each method's coefficients or weights over steps, in one PNG.

    Args:
        history: log tag -> ``(step, value)`` points; tags containing ``/acc/`` go to the left panel.
        path: where to write the PNG.

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure

    acc = {k: v for k, v in history.items() if "/acc/" in k}
    coeff = {k: v for k, v in history.items() if k not in acc}
    panels = [("per-modality train accuracy", acc)] + ([("method coefficients / weights", coeff)] if coeff else [])
    fig = Figure(figsize=(5.5 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels, strict=True):
        for key, points in sorted(series.items()):
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=key.removeprefix("mmbalance/"), linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    return out
