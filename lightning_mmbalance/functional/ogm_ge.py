"""OGM-GE: on-the-fly gradient modulation (Peng et al., CVPR 2022), the pure math.

Each modality's score is the summed softmax probability its unimodal logits give to the true class. A modality whose
score exceeds the mean score of the others (ratio rho > 1) is dominant and its encoder gradient is damped by
``1 - tanh(alpha * rho)``. For two modalities this is exactly the rule of the official code (GeWu-Lab/OGM-GE_CVPR2022):
``rho = S_second / S_first``, damp the second if ``rho > 1``, otherwise damp the first by ``1 - tanh(alpha / rho)``;
a tie damps the first modality (``tie="first"``). The journal code (Wei, Hu et al., T-PAMI 2024) damps the last one
(``tie="last"``); for unequal scores both give the same coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy
import torch
from torch import Tensor

from lightning_mmbalance.utilities.checks import check_choice, check_class_logits, check_scores

__all__ = ["TIE_RULES", "ogm_coefficients", "ogm_scores"]

TIE_RULES = ("first", "last")
"""Which modality a tie (no ratio above 1) damps: the first (CVPR code) or the last (journal code)."""


def ogm_scores(unimodal_logits: Mapping[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
    """Per-modality OGM score ``S_m = sum_i softmax(z_m,i)[y_i]``, a sum over the batch.

    Args:
        unimodal_logits: modality -> ``(B, C)`` logits, one common ``B`` and ``C``.
        targets: ``(B,)`` integer class indices in ``[0, C)``.

    Returns:
        modality -> 0-dim detached tensor on the logits' device (float32, or float64 for float64 logits).

    Raises:
        ValueError: malformed logits or targets.

    Example::

        >>> z = {"a": torch.tensor([[2.0, 0.0]]), "v": torch.tensor([[0.0, 0.0]])}
        >>> {m: round(float(s), 4) for m, s in ogm_scores(z, torch.tensor([0])).items()}
        {'a': 0.8808, 'v': 0.5}
    """
    if not unimodal_logits:
        raise ValueError("`unimodal_logits` is empty; OGM-GE needs the logits of every modality.")
    check_class_logits(unimodal_logits, targets, "unimodal logits tensor")
    sums = _ogm_score_update(list(unimodal_logits.values()), targets)
    return dict(zip(unimodal_logits, sums.unbind(), strict=True))


def _ogm_score_update(logits: Sequence[Tensor], targets: Tensor) -> Tensor:
    """``(M,)`` scores of one batch, unchecked: float32 (float64 for float64 logits), detached.

    One batched softmax over the stacked ``(M, B, C)`` logits (a few kernels, whatever ``M``).
    """
    z = torch.stack([t.detach() for t in logits])
    z = z if z.dtype == torch.float64 else z.float()
    index = targets.long().view(1, -1, 1).expand(z.shape[0], -1, 1)
    return torch.softmax(z, dim=2).gather(2, index).sum((1, 2))


def _ogm_ratio_compute(scores: Mapping[str, float]) -> dict[str, float]:
    """``rho_m = S_m / mean_{j != m} S_j`` (``+inf`` if the others are all 0 and ``S_m > 0``; 1 for ``0 / 0``).

    The others' mean is their own sum (not the total minus ``S_m``, which can be an ulp off), so for two modalities
    ``rho_1`` is exactly ``S_1 / S_2``.
    """
    n_others = len(scores) - 1
    ratios = {}
    for m, s in scores.items():
        others = sum(v for j, v in scores.items() if j != m) / n_others
        if others > 0:
            ratios[m] = s / others
        else:
            ratios[m] = math.inf if s > 0 else 1.0
    return ratios


def _ogm_coefficient_compute(ratios: Mapping[str, float], alpha: float, tie: str = "first") -> dict[str, float]:
    coefficients = {m: 1.0 - math.tanh(alpha * r) if r > 1.0 else 1.0 for m, r in ratios.items()}
    if all(r <= 1.0 for r in ratios.values()):  # a tie: the first (CVPR code) or the last (journal code) is damped
        coefficients[list(ratios)[0 if tie == "first" else -1]] = 1.0 - math.tanh(alpha)
    return coefficients


def ogm_coefficients(scores: Mapping[str, float | Tensor], alpha: float, tie: str = "first") -> dict[str, float]:
    """OGM-GE coefficients ``k_m``: ``1 - tanh(alpha * rho_m)`` for a dominant modality (``rho_m > 1``), else 1.

    ``rho_m`` is ``S_m`` over the mean score of the other modalities. If no ratio exceeds 1 (all scores equal),
    the first modality (``tie="first"``, the CVPR code) or the last one (``tie="last"``, the T-PAMI 2024 journal
    code) is damped by ``1 - tanh(alpha)``. For two modalities this is exactly the official rule.

    Args:
        scores: modality -> score ``S_m`` (finite, >= 0); the mapping order is the modality order.
        alpha: modulation strength, >= 0.
        tie: ``"first"`` or ``"last"``: which modality a tie damps.

    Returns:
        modality -> coefficient in ``[0, 1]``.

    Raises:
        ValueError: fewer than 2 modalities, a negative or non-finite score, a negative alpha, or another ``tie``.

    Example::

        >>> {m: round(k, 6) for m, k in ogm_coefficients({"audio": 1.723699, "visual": 0.931614}, 0.1).items()}
        {'audio': 0.81706, 'visual': 1.0}
    """
    values = check_scores("OGM-GE", scores)
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"`alpha` must be a finite float >= 0, got {alpha!r}.")
    check_choice("tie", tie, TIE_RULES)
    return _ogm_coefficient_compute(_ogm_ratio_compute(values), alpha, tie)


def _ogm_noise_seed(seed: int, global_step: int) -> int:
    """The GE noise generator's seed at ``global_step``: a 63-bit hash of ``(seed, global_step)``.

    Torch's CPU generator keeps only the low 32 bits of its seed, so ``seed * 2**32 + step`` would ignore ``seed``
    there. NumPy's ``SeedSequence`` mixes both into every bit, the low 32 included.
    """
    low, high = numpy.random.SeedSequence([seed, global_step]).generate_state(2, dtype=numpy.uint32).tolist()
    return (high & 0x7FFFFFFF) << 32 | low
