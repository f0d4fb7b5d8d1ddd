"""InfoReg: adaptive unimodal regulation (Huang, Wei, Yang & Hu, CVPR 2025), the pure math.

During the "prime learning window" of a modality, detected from the growth of a Fisher-information trace, the
encoder of a modality that scores higher than others gets the proximal term ``lambda_m * (theta - theta_0)`` added to
its gradient (``theta_0``: its weights at the start of the epoch). The score ``S_m`` is OGM-GE's summed true-class
probability (:func:`~lightning_mmbalance.functional.ogm_scores`); the gap ``Delta_m`` is the mean of ``S_m - S_j``
over the modalities ``j`` that score strictly lower (paper Eq. 9-10), and
``lambda_m = scale_m * exp(sensitivity * tanh(Delta_m))`` when ``Delta_m > 0`` and the window is open. The window is
open when the relative growth ``k = (A_new - A_old) / A_new`` of a moving average of per-epoch traces exceeds a
threshold. With two modalities and the defaults this is exactly the rule of the official code
(GeWu-Lab/InfoReg_CVPR2025).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from lightning_mmbalance.utilities.checks import check_choice, check_float, check_int

__all__ = [
    "inforeg_coefficients",
    "inforeg_gaps",
    "inforeg_growth",
    "inforeg_proximal_",
    "inforeg_trace_term",
    "inforeg_window_open",
]

TRACE_REDUCTIONS = ("layer_mean", "sum")
Scale = float | Sequence[float] | Mapping[str, float]


def _finite_scores(scores: Mapping[str, float | Tensor]) -> dict[str, float]:
    values = {m: float(s) for m, s in scores.items()}
    if len(values) < 2:
        raise ValueError(f"InfoReg needs at least 2 modalities, got {list(values)}.")
    bad = {m: s for m, s in values.items() if not math.isfinite(s)}
    if bad:
        raise ValueError(f"Scores must be finite, got {bad}.")
    return values


def _inforeg_gap_compute(scores: Mapping[str, float]) -> dict[str, float]:
    gaps = {}
    for m, s in scores.items():
        lower = [s - other for other in scores.values() if other < s]
        gaps[m] = sum(lower) / len(lower) if lower else 0.0
    return gaps


def inforeg_gaps(scores: Mapping[str, float | Tensor]) -> dict[str, float]:
    """The gaps ``Delta_m``: the mean of ``S_m - S_j`` over the modalities ``j`` with ``S_j < S_m`` (else 0).

    For two modalities the higher score gets the difference and the other 0; a tie gives 0 to both.

    Args:
        scores: modality -> score, in any unit (sums or means); the mapping order is the modality order.

    Returns:
        modality -> ``Delta_m >= 0``.

    Raises:
        ValueError: fewer than 2 modalities or a non-finite score.

    Example::

        >>> inforeg_gaps({"audio": 3.0, "visual": 1.0, "text": 2.0})
        {'audio': 1.5, 'visual': 0.0, 'text': 1.0}
    """
    return _inforeg_gap_compute(_finite_scores(scores))


def _resolve_scale(scale: Scale, modalities: Sequence[str]) -> dict[str, float]:
    """``scale`` per modality: a float for all, a sequence extended with its last value, or a mapping."""
    if isinstance(scale, Mapping):
        if set(scale) != set(modalities):
            raise ValueError(
                f"`scale` must give a value for exactly the modalities {list(modalities)}, got keys {list(scale)}."
            )
        values = {m: float(scale[m]) for m in modalities}
    elif isinstance(scale, Sequence):
        if not 0 < len(scale) <= len(modalities):
            raise ValueError(
                f"`scale` must hold 1 to {len(modalities)} values (one per modality {list(modalities)}), "
                f"got {list(scale)}."
            )
        padded = [*scale, *[scale[-1]] * (len(modalities) - len(scale))]
        values = {m: float(s) for m, s in zip(modalities, padded, strict=True)}
    else:
        values = dict.fromkeys(modalities, float(scale))
    bad = {m: s for m, s in values.items() if not (math.isfinite(s) and s >= 0)}
    if bad:
        raise ValueError(f"`scale` must be finite and >= 0 for every modality, got {bad}.")
    return values


def _inforeg_coefficient_compute(
    gaps: Mapping[str, float], window_open: Mapping[str, bool], scales: Mapping[str, float], sensitivity: float
) -> dict[str, float]:
    return {
        m: scales[m] * math.exp(sensitivity * math.tanh(gap)) if gap > 0 and window_open[m] and scales[m] > 0 else 0.0
        for m, gap in gaps.items()
    }


def inforeg_coefficients(
    scores: Mapping[str, float | Tensor],
    window_open: Mapping[str, bool],
    scale: Scale = (0.95, 0.1),
    sensitivity: float = 1.0,
) -> dict[str, float]:
    """The proximal coefficients ``lambda_m = scale_m * exp(sensitivity * tanh(Delta_m))``, 0 if not regulated.

    A modality is regulated when its gap :func:`inforeg_gaps` is positive and its window is open. The default
    ``scale=(0.95, 0.1)`` with ``sensitivity=1`` is the official code (0.95 for the first modality, 0.1 for every
    later one); ``scale=1.0, sensitivity=0.9`` is the paper's Eq. 16.

    Args:
        scores: modality -> score ``S_m`` in the caller's unit (batch sums as in the official code, or means).
        window_open: modality -> whether it may be regulated; the same keys as ``scores``.
        scale: a float >= 0 for every modality, a sequence in modality order (a sequence shorter than the number of
            modalities is extended with its last value), or a mapping modality -> float.
        sensitivity: ``beta`` of Eq. 16, a finite float >= 0.

    Returns:
        modality -> ``lambda_m >= 0``.

    Raises:
        ValueError: fewer than 2 modalities, a non-finite score, keys that differ, a negative or non-finite scale or
            sensitivity, a sequence longer than the number of modalities, or a mapping that misses a modality.
        TypeError: a ``sensitivity`` that is not a number.

    Example::

        >>> s = {"audio": 2.738336402205, "visual": 1.77612217815}
        >>> {m: round(c, 9) for m, c in inforeg_coefficients(s, {"audio": True, "visual": True}).items()}
        {'audio': 2.001645526, 'visual': 0.0}
    """
    values = _finite_scores(scores)
    if set(window_open) != set(values):
        raise ValueError(f"`window_open` must have the keys of `scores` {list(values)}, got {list(window_open)}.")
    check_float("sensitivity", sensitivity, 0)
    scales = _resolve_scale(scale, list(values))
    return _inforeg_coefficient_compute(_inforeg_gap_compute(values), window_open, scales, float(sensitivity))


def _inforeg_growth_compute(history: Sequence[float], window_size: int, pad_history: bool) -> float | None:
    if pad_history and not history:
        return 1.0  # the first epoch: the official code starts with k = 1
    traces = [*[0.0] * (window_size if pad_history else 0), *history]
    if len(traces) < window_size + 1:
        return None
    new = sum(traces[-window_size:]) / window_size
    old = sum(traces[-window_size - 1 : -1]) / window_size
    return (new - old) / new if new > 0 else None


def _check_history(history: Sequence[float], window_size: int) -> list[float]:
    check_int("window_size", window_size, 1)
    values = [float(t) for t in history]
    bad = [t for t in values if not (math.isfinite(t) and t >= 0)]
    if bad:
        raise ValueError(f"Traces must be finite and >= 0, got {bad}.")
    return values


def inforeg_growth(history: Sequence[float], window_size: int = 10, pad_history: bool = True) -> float | None:
    """The trace growth ``k`` that decides the window of the epoch after ``history``, or None if undefined.

    ``k = (A_new - A_old) / A_new`` with ``A_new`` the mean of the last ``window_size`` traces and ``A_old`` the same
    window one epoch earlier. With ``pad_history`` (the official code) the history is preceded by ``window_size``
    zeros and ``k = 1`` for an empty history; without it ``k`` is undefined until ``window_size + 1`` traces exist.
    ``k`` is undefined when ``A_new <= 0`` (the official code divides by zero there).

    Args:
        history: the per-epoch traces so far, oldest first, each finite and >= 0.
        window_size: ``W``, an int >= 1 (official 10; 1 is the paper's one-epoch change, Eq. 11).
        pad_history: precede the history with ``W`` zeros (official).

    Returns:
        ``k <= 1``, or None.

    Raises:
        ValueError: a negative or non-finite trace, or ``window_size < 1``.
        TypeError: a ``window_size`` that is not an int.

    Example::

        >>> round(inforeg_growth([2.0, 3.5]), 6)
        0.636364
        >>> inforeg_growth([2.0], window_size=1, pad_history=False) is None
        True
    """
    return _inforeg_growth_compute(_check_history(history, window_size), window_size, pad_history)


def inforeg_window_open(
    history: Sequence[float], threshold: float = 0.05, window_size: int = 10, pad_history: bool = True
) -> bool:
    """Whether the window is open in the epoch after ``history``: ``k`` is defined and ``k > threshold``.

    Args:
        history: the per-epoch traces so far, oldest first.
        threshold: ``K`` of Eq. 11 (official 0.05; the paper and the first release 0.04).
        window_size: see :func:`inforeg_growth`.
        pad_history: see :func:`inforeg_growth`.

    Returns:
        True if the window is open.

    Raises:
        ValueError: as :func:`inforeg_growth`, or a non-finite threshold.
        TypeError: as :func:`inforeg_growth`, or a threshold that is not a number.

    Example::

        >>> inforeg_window_open([2.0, 3.5, 4.2], threshold=0.05)
        True
    """
    check_float("threshold", threshold)
    k = inforeg_growth(history, window_size, pad_history)
    return k is not None and k > threshold


def _inforeg_trace_update(
    grads: Sequence[Tensor], numels: Sequence[int], reduction: str, device: torch.device
) -> Tensor:
    """One step's trace term of local tensors, a 0-dim float64 tensor on ``device`` (no host synchronisation).

    ``numels`` are the sizes of the whole tensors that ``grads`` are (parts of): under FSDP2 ``grads`` are a rank's
    shards and the result is that rank's partial sum, to be summed over the ranks.
    """
    pairs = [(g.detach(), n) for g, n in zip(grads, numels, strict=True) if g.numel()]
    if not pairs:
        return torch.zeros((), dtype=torch.float64, device=device)
    norms = [n.to(torch.float64) for n in torch._foreach_norm([g for g, _ in pairs])]
    squares = torch._foreach_mul(norms, norms)
    if reduction == "layer_mean":
        torch._foreach_div_(squares, [float(n) for _, n in pairs])
    return torch.stack(squares).sum()


def inforeg_trace_term(grads: Iterable[Tensor], reduction: str = "layer_mean") -> float:
    """One optimizer step's contribution to an encoder's Fisher-information trace, in float64.

    ``"layer_mean"`` (official) is ``sum_p ||g_p||^2 / numel_p``, which summed over an epoch's steps equals the
    official per-layer mean of element-wise accumulated squared gradients; ``"sum"`` is ``sum_p ||g_p||^2``, the
    literal trace of Eq. 7. Sharded gradients (FSDP2 ``DTensor``) are reduced over the ranks (a collective).

    Args:
        grads: the selected gradient tensors of one encoder.
        reduction: ``"layer_mean"`` or ``"sum"``.

    Returns:
        The term (0.0 for no tensors).

    Raises:
        ValueError: an unknown reduction.

    Example::

        >>> inforeg_trace_term([torch.tensor([[0.5, -0.5], [0.25, 0.0]])])
        0.140625
    """
    check_choice("reduction", reduction, TRACE_REDUCTIONS)
    tensors = [g.detach() for g in grads]
    if not tensors:
        return 0.0
    if any(hasattr(g, "full_tensor") for g in tensors):  # DTensors: each square sum is a partial, reduced here
        squares = [g.to(torch.float64).square().sum() for g in tensors]
        squares = [s.full_tensor() if hasattr(s, "full_tensor") else s for s in squares]
        weights = [1.0 / g.numel() if reduction == "layer_mean" else 1.0 for g in tensors]
        return float(torch.stack(squares).mul(torch.tensor(weights, dtype=torch.float64)).sum())
    return float(_inforeg_trace_update(tensors, [g.numel() for g in tensors], reduction, tensors[0].device))


def _inforeg_proximal_update(
    grads: list[Tensor], params: list[Tensor], anchors: list[Tensor], coefficient: float
) -> None:
    torch._foreach_add_(grads, torch._foreach_sub(params, anchors), alpha=coefficient)


def inforeg_proximal_(
    grads: Sequence[Tensor], params: Sequence[Tensor], anchors: Sequence[Tensor], coefficient: float
) -> None:
    """Add the proximal term in place: ``g <- g + coefficient * (p - p0)`` for every tensor (one foreach call).

    It is the gradient of ``(coefficient / 2) * ||theta - theta_0||^2``, the regulation term of the paper's Eq. 12.

    Args:
        grads: the gradients to change, in place.
        params: the parameters, one per gradient.
        anchors: the parameters' values at the start of the epoch, one per gradient.
        coefficient: ``lambda >= 0``.

    Raises:
        ValueError: lengths or shapes that do not match, or a negative or non-finite coefficient.

    Example::

        >>> g, p, p0 = torch.zeros(2), torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.5])
        >>> inforeg_proximal_([g], [p], [p0], 2.0)
        >>> g
        tensor([ 1., -1.])
    """
    if not len(grads) == len(params) == len(anchors):
        raise ValueError(
            f"`grads`, `params` and `anchors` must have one tensor each per parameter, got lengths "
            f"{len(grads)}, {len(params)} and {len(anchors)}."
        )
    shapes = [(tuple(g.shape), tuple(p.shape), tuple(a.shape)) for g, p, a in zip(grads, params, anchors, strict=True)]
    bad = [s for s in shapes if not s[0] == s[1] == s[2]]
    if bad:
        raise ValueError(f"Every gradient, parameter and anchor must have one shape, got {bad}.")
    check_float("coefficient", coefficient, 0)
    if grads:
        with torch.no_grad():
            _inforeg_proximal_update(
                list(grads), [p.detach() for p in params], [a.detach() for a in anchors], coefficient
            )
