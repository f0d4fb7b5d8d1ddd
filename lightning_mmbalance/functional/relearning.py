"""Diagnosing & Re-learning (Wei, Li, Feng & Hu, ECCV 2024), the pure math.

An encoder's learning state is diagnosed by how well k-means clusters of its features agree with the labels
(clustering purity) on the training data versus held-out data. A large gap means the encoder fits its training data
better than it generalises; it is then softly re-initialised, ``theta <- alpha * theta_0 + (1 - alpha) * theta`` with
``alpha = tanh(strength * |P_train - P_val|)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics.cluster import contingency_matrix
from sklearn.preprocessing import MinMaxScaler
from torch import Tensor

__all__ = ["clustering_purity", "relearning_alpha"]


def clustering_purity(features: Tensor, labels: Tensor, n_clusters: int, seed: int = 0) -> float:
    """Purity of a k-means clustering of ``features`` with respect to ``labels``.

    The features are MinMax-scaled to ``[-1, 1]`` (fitted on these features), clustered with
    ``KMeans(n_clusters, random_state=seed, n_init=10)``, and the purity is the fraction of samples whose label is
    the majority label of their cluster.

    Args:
        features: ``(N, D)`` features (kept in their dtype; float32 as in the official code).
        labels: ``(N,)`` integer labels, any values.
        n_clusters: number of clusters, >= 2 (the number of classes in the method).
        seed: k-means ``random_state``.

    Returns:
        Purity in ``[0, 1]``.

    Raises:
        ValueError: shapes disagree, ``N < n_clusters`` or ``n_clusters < 2``.

    Example::

        >>> x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.1, 0.0]])
        >>> clustering_purity(x, torch.tensor([0, 0, 1, 0]), n_clusters=2)
        0.75
    """
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"`features` must be (N, D) and `labels` (N,), got {tuple(features.shape)} and {tuple(labels.shape)}."
        )
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 2:
        raise ValueError(f"`n_clusters` must be an int >= 2, got {n_clusters!r}.")
    if features.shape[0] < n_clusters:
        raise ValueError(f"Need at least n_clusters = {n_clusters} samples, got {features.shape[0]}.")
    x = features.detach().cpu().numpy()
    x = x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)
    scaled = MinMaxScaler(feature_range=(-1, 1)).fit_transform(x)
    clusters = KMeans(n_clusters=n_clusters, random_state=seed, n_init=10).fit_predict(scaled)
    table = contingency_matrix(labels.detach().cpu().numpy(), clusters)
    return float(table.max(axis=0).sum() / features.shape[0])


def relearning_alpha(train_purity: float, val_purity: float, strength: float) -> float:
    """Re-initialisation strength ``alpha = tanh(strength * |train_purity - val_purity|)``.

    Args:
        train_purity: purity on the training features, in ``[0, 1]``.
        val_purity: purity on the held-out features, in ``[0, 1]``.
        strength: ``lambda``, >= 0 (3 in the official scripts).

    Raises:
        ValueError: a purity outside ``[0, 1]`` or a negative strength.

    Example::

        >>> round(relearning_alpha(7 / 9, 5 / 6, 3.0), 6)
        0.16514
    """
    for name, value in (("train_purity", train_purity), ("val_purity", val_purity)):
        if not 0 <= value <= 1:
            raise ValueError(f"`{name}` must be in [0, 1], got {value!r}.")
    if not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"`strength` must be a finite float >= 0, got {strength!r}.")
    return math.tanh(strength * abs(train_purity - val_purity))


def _relearning_interpolate_(params: Sequence[Tensor], initial: Sequence[Tensor], alpha: float) -> None:
    """In place: ``theta <- alpha * theta_0 + (1 - alpha) * theta`` (the Parameter objects stay the same)."""
    with torch.no_grad():
        for p, p0 in zip(params, initial, strict=True):
            p.mul_(1.0 - alpha).add_(p0.to(device=p.device, dtype=p.dtype), alpha=alpha)
