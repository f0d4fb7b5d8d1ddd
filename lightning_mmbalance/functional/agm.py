r"""AGM: adaptive gradient modulation (Li et al., ICCV 2023), the pure math.

A modality's mono-modal response is its Shapley-style share of the fused logits over the coalitions of modalities
kept (the others masked), ``m_m = sum_{S subset of M \ {m}} w_|S| (F(S + m) - F(S))`` with ``F(empty) = 0`` and
``w_s = s! (N - s - 1)! / N!``, so that the responses sum to ``F(M)``. Its score is the mean cross-entropy of the
response, each sample's term capped at ``-ln 1e-8``. The ratio ``r_m = exp(N / (N - 1) (mean_k s_k - s_m))`` is
compared with the same ratio of the running (cumulative mean) scores, and the coefficient
``k_m = exp(alpha * min(r_target_m - r_m, cap))`` damps the modality that is relatively stronger than it used to be.
For two and three modalities these are exactly the rules of the official code (lihongcs/AGM, CREMA-D and UR-Funny).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mmbalance.utilities.checks import check_class_logits

__all__ = [
    "agm_coefficients",
    "agm_masked_coalitions",
    "agm_mono_responses",
    "agm_ratios",
    "agm_scores",
    "agm_update_running",
]

MIN_PROB = 1e-8
"""The official floor on a sample's true-class probability: its loss term is at most ``-ln 1e-8``."""


def _check_modalities(modalities: Sequence[str]) -> None:
    if len(modalities) < 2 or len(set(modalities)) != len(modalities):
        raise ValueError(f"AGM needs at least 2 distinct modalities, got {list(modalities)}.")


def agm_masked_coalitions(modalities: Sequence[str]) -> list[frozenset[str]]:
    """The ``2^N - 2`` non-empty proper subsets of ``modalities``, each the set of modalities **kept**.

    Ordered by size, then in ``itertools.combinations`` order.

    Raises:
        ValueError: fewer than 2 modalities, or repeated names.

    Example::

        >>> [sorted(c) for c in agm_masked_coalitions(["a", "v", "t"])]
        [['a'], ['v'], ['t'], ['a', 'v'], ['a', 't'], ['t', 'v']]
    """
    _check_modalities(modalities)
    n = len(modalities)
    return [frozenset(c) for size in range(1, n) for c in itertools.combinations(modalities, size)]


def _response_weights(modalities: Sequence[str]) -> dict[str, dict[frozenset[str], float]]:
    """``m_m = sum_T c[m][T] F(T)`` over the non-empty coalitions ``T`` (the full one included, ``F(empty) = 0``).

    ``c[m][T] = w_{|T| - 1}`` if ``m`` is kept in ``T``, else ``-w_{|T|}``, with the Shapley weights ``w_s``.
    """
    n = len(modalities)

    def w(s: int) -> float:
        return math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n)

    coalitions = [*agm_masked_coalitions(modalities), frozenset(modalities)]
    return {m: {t: w(len(t) - 1) if m in t else -w(len(t)) for t in coalitions} for m in modalities}


def _response_matrix(modalities: Sequence[str]) -> list[list[float]]:
    """``c[m][T]`` as rows per modality over the coalitions of :func:`agm_masked_coalitions`, then the full set."""
    weights = _response_weights(modalities)
    coalitions = [*agm_masked_coalitions(modalities), frozenset(modalities)]
    return [[weights[m][t] for t in coalitions] for m in modalities]


def agm_mono_responses(
    coalition_logits: Mapping[frozenset[str], Tensor], modalities: Sequence[str]
) -> dict[str, Tensor]:
    """Each modality's mono-modal response ``m_m`` (its Shapley share of the fused logits), in the logits' dtype.

    Args:
        coalition_logits: set of modalities kept -> ``(B, C)`` fused logits with the others masked; needs the full
            set and every set of :func:`agm_masked_coalitions` (the empty set is not used).
        modalities: the modality names, in order.

    Returns:
        modality -> ``(B, C)`` detached response; the responses sum to the full set's logits.

    Raises:
        ValueError: a missing coalition, or logits of different shapes.

    Example::

        >>> f = {frozenset("av"): torch.tensor([[1.0, 0.0]]), frozenset("a"): torch.tensor([[0.5, 0.0]]),
        ...      frozenset("v"): torch.tensor([[0.25, 0.25]])}
        >>> {m: r.tolist() for m, r in agm_mono_responses(f, ["a", "v"]).items()}
        {'a': [[0.625, -0.125]], 'v': [[0.375, 0.125]]}
    """
    weights = _response_weights(modalities)
    needed = weights[modalities[0]]
    missing = [sorted(t) for t in needed if t not in coalition_logits]
    if missing:
        raise ValueError(f"`coalition_logits` lacks the coalitions {missing} (each the set of modalities kept).")
    shapes = {tuple(sorted(t)): tuple(coalition_logits[t].shape) for t in needed}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"Every coalition's logits must be (B, C) with one common B and C, got {shapes}.")
    responses = {}
    for m in modalities:
        parts = [c * coalition_logits[t].detach() for t, c in weights[m].items()]
        responses[m] = torch.stack(parts).sum(0)
    return responses


def _agm_score_update(responses: Tensor, targets: Tensor, min_prob: float = MIN_PROB) -> Tensor:
    """``(M,)`` float64 sums of the capped cross-entropy over the batch of ``(M, B, C)`` responses, unchecked."""
    z = responses.detach().double()
    index = targets.long().view(1, -1, 1).expand(z.shape[0], -1, 1)
    return (-F.log_softmax(z, dim=2).gather(2, index)).clamp(max=-math.log(min_prob)).sum((1, 2))


def agm_scores(responses: Mapping[str, Tensor], targets: Tensor, min_prob: float = MIN_PROB) -> dict[str, Tensor]:
    """Each modality's score: the mean over the batch of ``min(-log softmax(m_m)[y], -ln min_prob)``; lower is stronger.

    Args:
        responses: modality -> ``(B, C)`` response (or any logits), one common ``B`` and ``C``.
        targets: ``(B,)`` integer class indices in ``[0, C)``.
        min_prob: the floor on the true-class probability, in ``(0, 1)``; 1e-8 is the official value.

    Returns:
        modality -> float64 0-dim detached tensor.

    Raises:
        ValueError: malformed responses or targets, or ``min_prob`` outside ``(0, 1)``.

    Example::

        >>> s = agm_scores({"a": torch.tensor([[2.0, 0.0]]), "v": torch.tensor([[0.0, 0.0]])}, torch.tensor([0]))
        >>> {m: round(float(v), 4) for m, v in s.items()}
        {'a': 0.1269, 'v': 0.6931}
    """
    if isinstance(min_prob, bool) or not (isinstance(min_prob, float | int) and 0 < min_prob < 1):
        raise ValueError(f"`min_prob` must be a float in (0, 1), got {min_prob!r}.")
    batch, _ = check_class_logits(responses, targets, "response")
    sums = _agm_score_update(torch.stack(list(responses.values())), targets, min_prob) / max(batch, 1)
    return dict(zip(responses, sums.unbind(), strict=True))


def _exp(x: float) -> float:
    """``math.exp`` that returns ``inf`` instead of raising ``OverflowError``."""
    return math.exp(x) if x < 709.0 else math.inf


def agm_ratios(scores: Mapping[str, float | Tensor]) -> dict[str, float]:
    """``r_m = exp(N / (N - 1) * (mean_k s_k - s_m))`` = ``exp(mean_{k != m} s_k - s_m)``.

    Raises:
        ValueError: fewer than 2 modalities, or a non-finite score.

    Example::

        >>> {m: round(r, 6) for m, r in agm_ratios({"a": 0.9, "v": 1.4}).items()}
        {'a': 1.648721, 'v': 0.606531}
    """
    values = {m: float(s) for m, s in scores.items()}
    _check_modalities(list(values))
    bad = {m: s for m, s in values.items() if not math.isfinite(s)}
    if bad:
        raise ValueError(f"AGM scores must be finite, got {bad}.")
    n = len(values)
    mean = sum(values.values()) / n
    return {m: _exp(n / (n - 1) * (mean - s)) for m, s in values.items()}


def agm_coefficients(
    scores: Mapping[str, float | Tensor],
    running_scores: Mapping[str, float | Tensor],
    alpha: float,
    cap: float | None = 10.0,
) -> dict[str, float]:
    """AGM's coefficients ``k_m = exp(alpha * min(r_target_m - r_m, cap))``.

    ``r`` are :func:`agm_ratios` of this step's ``scores``, ``r_target`` those of the running scores before this step's
    update (all 0 at the first step, giving targets of 1). ``k_m < 1`` damps a modality that is now relatively
    stronger than its running average says.

    Args:
        scores: modality -> this step's score; the mapping order is the modality order.
        running_scores: modality -> running score, the same modalities.
        alpha: modulation strength, finite and >= 0.
        cap: upper bound on ``r_target_m - r_m``, > 0, or None for none (10 CREMA-D, 7 UR-Funny).

    Returns:
        modality -> coefficient in ``(0, inf]``: ``inf`` where the exponential overflows (possible only without a cap).

    Raises:
        ValueError: an argument outside the ranges above, or running scores for other modalities.

    Example::

        >>> k = agm_coefficients({"a": 0.9, "v": 1.4}, {"a": 0.0, "v": 0.0}, alpha=1.5)
        >>> {m: round(v, 6) for m, v in k.items()}
        {'a': 0.377917, 'v': 1.804356}
    """
    if isinstance(alpha, bool) or not isinstance(alpha, float | int) or not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"`alpha` must be a finite float >= 0, got {alpha!r}.")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, float | int) or not cap > 0):
        raise ValueError(f"`cap` must be a float > 0 or None, got {cap!r}.")
    if list(running_scores) != list(scores):
        raise ValueError(
            f"`running_scores` must have the modalities of `scores` {list(scores)}, got {list(running_scores)}."
        )
    ratios, targets = agm_ratios(scores), agm_ratios(running_scores)
    gaps = {m: targets[m] - ratios[m] for m in ratios}
    return {m: _exp(alpha * (gap if cap is None else min(gap, cap))) for m, gap in gaps.items()}


def agm_update_running(
    running_scores: Mapping[str, float | Tensor], scores: Mapping[str, float | Tensor], step: int
) -> dict[str, float]:
    """The cumulative mean ``S * (step - 1) / step + s / step`` after ``step`` steps (``step`` counts this one).

    Raises:
        ValueError: ``step`` < 1, or scores for other modalities.

    Example::

        >>> agm_update_running({"a": 0.5, "v": 1.5}, {"a": 1.0, "v": 1.0}, step=2)
        {'a': 0.75, 'v': 1.25}
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"`step` must be an int >= 1, got {step!r}.")
    if list(running_scores) != list(scores):
        raise ValueError(
            f"`scores` must have the modalities of `running_scores` {list(running_scores)}, got {list(scores)}."
        )
    return {m: float(running_scores[m]) * (step - 1) / step + float(scores[m]) / step for m in running_scores}
