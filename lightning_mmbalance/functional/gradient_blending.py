"""Gradient Blending: OGR-optimal loss weights (Wang, Tran & Feiszli, CVPR 2020), the pure math.

For each head h (each modality, and the fused head), the generalisation gain over a window is
``G_h = L^V_start - L^V_end`` and the change in overfitting ``dO_h = (L^V_end - L^T_end) - (L^V_start - L^T_start)``.
The weights are ``w_h ∝ G_h / dO_h^2``, normalised to sum to 1 (the paper's Prop. 1 with its practical estimator).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from lightning_mmbalance.utilities.checks import check_choice

__all__ = ["gblend_weights"]

POLICIES = ("clip", "abs")


@dataclass(frozen=True)
class _GBlendTerms:
    generalization: dict[str, float]  # G
    overfitting: dict[str, float]  # dO
    raw: dict[str, float]
    weights: dict[str, float]
    all_zero: bool

    @property
    def ogr(self) -> dict[str, float]:
        """|dO| / max(|G|, 1e-8): overfitting per unit of generalisation."""
        return {h: abs(o) / max(abs(self.generalization[h]), 1e-8) for h, o in self.overfitting.items()}


def _gblend_compute(
    train_start: Mapping[str, float],
    val_start: Mapping[str, float],
    train_end: Mapping[str, float],
    val_end: Mapping[str, float],
    policy: str,
    eps: float,
) -> _GBlendTerms:
    keys = list(train_start)
    sets = [set(d) for d in (train_start, val_start, train_end, val_end)]
    if any(s != sets[0] for s in sets):
        raise ValueError(f"The four loss mappings must have the same heads, got {[sorted(s) for s in sets]}.")
    if len(keys) < 2:
        raise ValueError(f"Gradient Blending needs at least 2 heads, got {keys}.")
    values = [float(d[h]) for d in (train_start, val_start, train_end, val_end) for h in keys]
    if not all(math.isfinite(v) for v in values):
        raise ValueError("Losses must be finite.")
    check_choice("policy", policy, POLICIES)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"`eps` must be a finite float >= 0, got {eps!r}.")
    g = {h: val_start[h] - val_end[h] for h in keys}
    d_o = {h: (val_end[h] - train_end[h]) - (val_start[h] - train_start[h]) for h in keys}
    raw = {}
    for h in keys:
        numerator = max(g[h], 0.0) if policy == "clip" else abs(g[h])
        denominator = d_o[h] ** 2 + eps
        if denominator == 0:
            if numerator > 0:
                raise ValueError(f"Head {h!r} has dO = 0 and G > 0 with eps = 0: its weight is infinite; use eps > 0.")
            raw[h] = 0.0
        else:
            raw[h] = numerator / denominator
    total = sum(raw.values())
    all_zero = total == 0
    weights = {h: 1.0 / len(keys) for h in keys} if all_zero else {h: r / total for h, r in raw.items()}
    return _GBlendTerms(g, d_o, raw, weights, all_zero)


def gblend_weights(
    train_start: Mapping[str, float],
    val_start: Mapping[str, float],
    train_end: Mapping[str, float],
    val_end: Mapping[str, float],
    policy: str = "clip",
    eps: float = 1e-8,
) -> dict[str, float]:
    """Gradient-Blending weights from the mean losses of each head at the start and end of a window.

    Args:
        train_start: head -> mean training loss at the start of the window (``L^T_N``).
        val_start: head -> mean held-out loss at the start (``L^V_N``).
        train_end: head -> mean training loss at the end (``L^T_{N+n}``).
        val_end: head -> mean held-out loss at the end (``L^V_{N+n}``).
        policy: ``"clip"`` (a head with ``G <= 0`` gets weight 0) or ``"abs"`` (``|G|``, as BalanceBenchmark).
        eps: added to ``dO^2``; 0 gives the unguarded formula.

    Returns:
        head -> weight, summing to 1; uniform if every raw weight is 0.

    Raises:
        ValueError: different head sets, fewer than 2 heads, non-finite losses, unknown policy, ``eps < 0``, or
            ``eps = 0`` with ``dO = 0`` and a positive numerator.

    Example::

        >>> w = gblend_weights(
        ...     {"audio": 1.60, "visual": 1.75, "fused": 1.55}, {"audio": 1.70, "visual": 1.78, "fused": 1.65},
        ...     {"audio": 0.90, "visual": 1.30, "fused": 0.60}, {"audio": 1.40, "visual": 1.45, "fused": 1.25}, eps=0,
        ... )
        >>> {h: round(v, 4) for h, v in w.items()}
        {'audio': 0.0718, 'visual': 0.8776, 'fused': 0.0506}
    """
    return _gblend_compute(train_start, val_start, train_end, val_end, policy, eps).weights
