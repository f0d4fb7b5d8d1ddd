"""MMPareto: Pareto integration of the multimodal and unimodal gradients (Wei & Hu, ICML 2024), the pure math.

For one encoder, ``g_mm`` is the gradient of the multimodal (fused) loss and ``g_u`` that of the encoder's own
unimodal loss. If they agree (cosine > 0) both get weight 1/2; otherwise the weights are the closed-form min-norm
point of the two-task problem, with the official code's clips. Each tensor's new gradient has the direction of
``n = 2 w_mm g_mm + 2 w_u g_u`` and the norm ``gamma * max(||g_mm + g_u||, ||n||)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["mmpareto_combine", "pareto_weights"]

_GUARD = 1e-12


@dataclass(frozen=True)
class _MMParetoProducts:
    """Dot products of one encoder's two gradients: v11 = <g_mm, g_mm>, v12 = <g_mm, g_u>, v22 = <g_u, g_u>."""

    v11: float
    v12: float
    v22: float

    @property
    def cos(self) -> float:
        if self.v11 <= 0 or self.v22 <= 0:
            return 0.0
        return self.v12 / (math.sqrt(self.v11) * math.sqrt(self.v22))

    @property
    def conflict(self) -> bool:
        return self.cos <= 0

    def weights(self) -> tuple[float, float]:
        """(w_mm, w_u): 1/2 each without conflict, else the two-task min-norm solution with the official clips."""
        if not self.conflict:
            return 0.5, 0.5
        if self.v12 >= self.v11:
            gamma = 0.999
        elif self.v12 >= self.v22:
            gamma = 0.001
        else:
            gamma = (self.v22 - self.v12) / (self.v11 + self.v22 - 2 * self.v12)
        return gamma, 1.0 - gamma


def _dot64(a: Tensor, b: Tensor) -> Tensor:
    return torch.sum(a.double() * b.double()) if a.dtype != torch.float64 else torch.dot(a.flatten(), b.flatten())


def _mmpareto_products(g_mm: Sequence[Tensor], g_u: Sequence[Tensor]) -> Tensor:
    """Stacked float64 ``[v11, v12, v22]`` over a list of tensors (per-tensor dot products, summed)."""
    rows = [torch.stack([_dot64(a, a), _dot64(a, b), _dot64(b, b)]) for a, b in zip(g_mm, g_u, strict=True)]
    return torch.stack(rows).sum(0)


def _mmpareto_tensor_factors(
    total_norms: Sequence[float], n_norms: Sequence[float], gamma: float
) -> list[tuple[float, bool]]:
    """Per tensor: (factor on n_t, guard). final_t = factor * n_t, or gamma * (g_mm,t + g_u,t) when guarded."""
    out = []
    for s, n in zip(total_norms, n_norms, strict=True):
        if n < _GUARD:
            out.append((gamma, True))
        else:
            out.append((gamma * max(s, n) / n, False))
    return out


def pareto_weights(g_mm: Tensor, g_u: Tensor) -> tuple[float, float]:
    """The MMPareto weights ``(w_mm, w_u)`` of two flat gradients.

    ``(0.5, 0.5)`` if their cosine is positive; otherwise the closed-form two-task min-norm solution
    ``gamma = (v22 - v12) / (v11 + v22 - 2 v12)``, clipped to 0.999 if ``v12 >= v11`` and to 0.001 if ``v12 >= v22``
    (the official solver's cases). The cosine is taken as 0 when either gradient is zero.

    Args:
        g_mm: flat gradient of the multimodal loss.
        g_u: flat gradient of the unimodal loss, same shape.

    Returns:
        ``(w_mm, w_u)``, summing to 1.

    Raises:
        ValueError: shape mismatch or non-finite input.

    Example::

        >>> pareto_weights(torch.tensor([1.0, 0.0, 0.5]), torch.tensor([-1.0, 2.0, 0.0]))
        (0.7272727272727273, 0.2727272727272727)
    """
    _check_pair(g_mm, g_u, "g_mm", "g_u")
    v11, v12, v22 = _mmpareto_products([g_mm], [g_u]).tolist()
    return _MMParetoProducts(v11, v12, v22).weights()


def mmpareto_combine(g_mm: Sequence[Tensor], g_u: Sequence[Tensor], gamma: float = 1.5) -> list[Tensor]:
    """The MMPareto gradient of one encoder's tensors.

    The weights come from the concatenation of all the tensors; then each tensor ``t`` gets
    ``gamma * max(||g_mm,t + g_u,t||, ||n_t||) * n_t / ||n_t||`` with ``n_t = 2 w_mm g_mm,t + 2 w_u g_u,t``, or
    ``gamma * (g_mm,t + g_u,t)`` when ``||n_t|| < 1e-12`` (the package's guard; the official code divides by zero).

    Args:
        g_mm: per-tensor gradients of the multimodal loss.
        g_u: per-tensor gradients of the encoder's unimodal loss (same length and shapes).
        gamma: magnitude factor, > 0 (1.5 in the official code).

    Returns:
        New tensors, in the input dtype.

    Raises:
        ValueError: mismatched lists or shapes, non-finite input, or ``gamma <= 0``.

    Example::

        >>> mmpareto_combine([torch.tensor([1.0, 1.0])], [torch.tensor([2.0, 0.0])])
        [tensor([4.5000, 1.5000])]
    """
    if not (isinstance(gamma, int | float) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"`gamma` must be a finite float > 0, got {gamma!r}.")
    if len(g_mm) != len(g_u) or not g_mm:
        raise ValueError(f"`g_mm` and `g_u` must be non-empty lists of equal length, got {len(g_mm)} and {len(g_u)}.")
    for i, (a, b) in enumerate(zip(g_mm, g_u, strict=True)):
        _check_pair(a, b, f"g_mm[{i}]", f"g_u[{i}]")
    w_mm, w_u = _MMParetoProducts(*_mmpareto_products(g_mm, g_u).tolist()).weights()
    totals = [a + b for a, b in zip(g_mm, g_u, strict=True)]
    ns = [2 * w_mm * a + 2 * w_u * b for a, b in zip(g_mm, g_u, strict=True)]
    norms = torch.stack([torch.linalg.vector_norm(t.double()) for t in totals + ns]).tolist()
    factors = _mmpareto_tensor_factors(norms[: len(ns)], norms[len(ns) :], gamma)
    return [gamma * t if guard else factor * n for t, n, (factor, guard) in zip(totals, ns, factors, strict=True)]


def _check_pair(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError(f"`{name_a}` and `{name_b}` must be finite.")
