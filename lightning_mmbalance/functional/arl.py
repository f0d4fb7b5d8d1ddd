"""ARL: asymmetric representation learning (Wei, Luo & Luo, ICCV 2025), the pure math.

"Improving Multimodal Learning via Imbalanced Learning" (arXiv 2507.10203; official code shicaiwei123/ICCV2025-ARL).
Not the AAAI 2025 "Asymmetric Reinforcing against Multi-modal Representation Bias", a different method.

Each modality's contribution is the batch-mean L1 norm of its unimodal logits; its variance is proxied by the mean
prediction entropy. The ideal share of a modality is inversely proportional to its (normalised, floored) entropy,
and the coefficients ``a = softmax(T * q_m * prod_{k != m} d_k)`` boost the encoder whose contribution lags its
ideal share. For two modalities this is exactly the official ``softmax(T * d_v * q_a, T * d_a * q_v)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["arl_coefficients"]


@dataclass(frozen=True)
class _ARLState:
    """Every quantity of one coefficient computation, per modality in order."""

    contribution: list[float]  # d_hat
    entropy: list[float]  # H (nats, unnormalised)
    normalized_entropy: list[float]  # H_hat before the floor
    ideal_share: list[float]  # q_hat
    coefficient: list[float]  # a


def _arl_update(logits: Sequence[Tensor]) -> dict[str, Tensor]:
    """Float64 batch sums, detached: ``abs_logit`` ``[sum_b ||z_m||_1]_m`` and ``entropy`` ``[sum_b H_m]_m``."""
    abs_sums, entropy_sums = [], []
    for z in logits:
        z = z.detach().double()
        p = torch.softmax(z, dim=1)
        abs_sums.append(z.abs().sum())
        entropy_sums.append(-(p * torch.log(p + 1e-16)).sum())
    return {"abs_logit": torch.stack(abs_sums), "entropy": torch.stack(entropy_sums)}


def _normalise(values: Sequence[float]) -> list[float]:
    total = sum(values)
    if total == 0:
        return [1.0 / len(values)] * len(values)
    return [v / total for v in values]


def _arl_compute(
    abs_sums: Sequence[float], entropy_sums: Sequence[float], count: float, temperature: float, entropy_floor: float
) -> _ARLState:
    d_hat = _normalise(abs_sums)  # the 1/B of the batch mean cancels
    entropy = [h / count for h in entropy_sums]
    h_hat = _normalise(entropy)
    q = [1.0 / max(h, entropy_floor) for h in h_hat]
    q_hat = _normalise(q)
    scores = [temperature * q_hat[m] * math.prod(d for k, d in enumerate(d_hat) if k != m) for m in range(len(d_hat))]
    top = max(scores)
    exp = [math.exp(s - top) for s in scores]
    a = [e / sum(exp) for e in exp]
    return _ARLState(d_hat, entropy, h_hat, q_hat, a)


def arl_coefficients(
    unimodal_logits: Mapping[str, Tensor], temperature: float, entropy_floor: float = 0.3
) -> dict[str, float]:
    """ARL coefficients ``a_m`` (summing to 1) of one batch; encoder m's gradient is then scaled by ``1 + a_m``.

    ``d_m`` = mean over the batch of ``sum_c |z_m|``, normalised to shares; ``H_m`` = mean prediction entropy
    (natural log of ``p + 1e-16``), normalised to shares and floored at ``entropy_floor``; ``q_m`` proportional to
    ``1 / H_m``; ``a = softmax(T * q_m * prod_{k != m} d_k)``. A zero total contribution or entropy gives equal shares.

    Args:
        unimodal_logits: modality -> ``(B, C)`` logits (one common ``B``); the mapping order is the modality order.
        temperature: ``T``, >= 0.
        entropy_floor: floor on the normalised entropy, in ``[0, 1)``. 0.3 assumes two modalities; ~0.6/N is the
            analogue for N.

    Returns:
        modality -> coefficient.

    Raises:
        ValueError: fewer than 2 modalities, malformed logits, or an argument out of range.

    Example::

        >>> z = {"audio": torch.tensor([[4.0, -4.0]]), "visual": torch.tensor([[0.1, 0.0]])}
        >>> {m: round(a, 4) for m, a in arl_coefficients(z, temperature=8.0).items()}
        {'audio': 0.1476, 'visual': 0.8524}
    """
    if len(unimodal_logits) < 2:
        raise ValueError(f"ARL needs at least 2 modalities, got {list(unimodal_logits)}.")
    shapes = {m: tuple(z.shape) for m, z in unimodal_logits.items()}
    if any(len(s) != 2 for s in shapes.values()) or len({s[0] for s in shapes.values()}) != 1:
        raise ValueError(f"Every unimodal logits tensor must be (B, C) with one common B, got {shapes}.")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"`temperature` must be a finite float >= 0, got {temperature!r}.")
    if not 0 <= entropy_floor < 1:
        raise ValueError(f"`entropy_floor` must be in [0, 1), got {entropy_floor!r}.")
    sums = _arl_update(list(unimodal_logits.values()))
    count = float(next(iter(shapes.values()))[0])
    state = _arl_compute(sums["abs_logit"].tolist(), sums["entropy"].tolist(), count, temperature, entropy_floor)
    return dict(zip(unimodal_logits, state.coefficient, strict=True))
