"""Diagnostics of modality imbalance, the pure math: per-modality accuracy and loss, Shapley values, linear probes.

What the monitor measures besides the methods' own quantities (OGM-GE's score and ratio, ARL's entropy and logit
norm, MMPareto's gradient cosine come from those methods' modules):

- the accuracy and cross-entropy of each modality's unimodal logits;
- the conditional utilisation rate of Wu et al. (ICML 2022), ``u_m = (acc(all) - acc(all without m)) / acc(all)``;
- the Shapley value of accuracy over the subsets of present modalities (BalanceBenchmark's imbalance indicator);
- the accuracy of a linear probe on an encoder's features (the "uni-modal linear evaluation" of the GeWu-Lab papers).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["probe_accuracy", "shapley_values", "utilization"]


def _unimodal_update(logits: Sequence[Tensor], targets: Tensor) -> dict[str, Tensor]:
    """Float64 batch sums per modality, detached: ``correct`` (correct predictions) and ``loss`` (cross-entropy)."""
    correct, losses = [], []
    for z in logits:
        z = z.detach()
        z = z if z.dtype == torch.float64 else z.float()
        correct.append((z.argmax(1) == targets).sum().double())
        losses.append(F.cross_entropy(z, targets, reduction="sum").double())
    return {"correct": torch.stack(correct), "loss": torch.stack(losses)}


def utilization(accuracy: Mapping[frozenset[str], float], modalities: Sequence[str]) -> dict[str, float]:
    """Conditional utilisation rate of each modality: ``(acc(all) - acc(all without m)) / acc(all)`` (0 if acc is 0).

    Args:
        accuracy: subset of present modalities -> accuracy; needs the full set and each set without one modality.
        modalities: the modality names.

    Example::

        >>> acc = {frozenset("av"): 0.8, frozenset("a"): 0.6, frozenset("v"): 0.4}
        >>> {m: round(u, 6) for m, u in utilization(acc, ["a", "v"]).items()}
        {'a': 0.5, 'v': 0.25}
    """
    everything = frozenset(modalities)
    full = accuracy[everything]
    return {m: (full - accuracy[everything - {m}]) / full if full > 0 else 0.0 for m in modalities}


def shapley_values(accuracy: Mapping[frozenset[str], float], modalities: Sequence[str]) -> dict[str, float]:
    """Exact Shapley value of each modality for the set function ``accuracy`` (subset of present modalities).

    Args:
        accuracy: every subset of ``modalities`` (the empty one included) -> accuracy.
        modalities: the players.

    Returns:
        modality -> Shapley value; they sum to ``accuracy(all) - accuracy(none)``.

    Example::

        >>> acc = {frozenset(): 0.1, frozenset("a"): 0.6, frozenset("v"): 0.3, frozenset("av"): 0.8}
        >>> {m: round(v, 6) for m, v in shapley_values(acc, ["a", "v"]).items()}
        {'a': 0.5, 'v': 0.2}
    """
    k = len(modalities)
    out = {}
    for m in modalities:
        others = [o for o in modalities if o != m]
        value = 0.0
        for size in range(k):
            weight = math.factorial(size) * math.factorial(k - size - 1) / math.factorial(k)
            for subset in itertools.combinations(others, size):
                s = frozenset(subset)
                value += weight * (accuracy[s | {m}] - accuracy[s])
        out[m] = value
    return out


def probe_accuracy(train_x: Tensor, train_y: Tensor, eval_x: Tensor, eval_y: Tensor) -> float:
    """Accuracy on ``eval`` of a logistic-regression probe (standardised features) fitted on ``train``.

    Example::

        >>> x = torch.tensor([[0.0], [0.1], [1.0], [1.1]])
        >>> probe_accuracy(x, torch.tensor([0, 0, 1, 1]), x, torch.tensor([0, 0, 1, 1]))
        1.0
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    probe.fit(train_x.numpy(), train_y.numpy())
    return float(probe.score(eval_x.numpy(), eval_y.numpy()))
