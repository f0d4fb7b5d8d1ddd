"""OPM: on-the-fly prediction modulation (Wei, Hu et al., T-PAMI 2024), the pure math.

The dominant modality's encoder features are dropped, sample by sample, with a probability that grows with the
modality discrepancy, and every modality's features are rescaled by ``1 / (1 - theta)``, theta being the expected
dropped fraction of the concatenated features. The scores are the OGM-GE scores
(:func:`~lightning_mmbalance.functional.ogm_scores`). For two modalities the drop probabilities are exactly those of the
official code (GeWu-Lab/BML_TPAMI2024, ``calcu_q``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy
import torch
from torch import Tensor

from lightning_mmbalance.functional.ogm_ge import _ogm_ratio_compute
from lightning_mmbalance.utilities.checks import check_float, check_int, check_scores

__all__ = ["opm_drop_features", "opm_drop_probabilities", "opm_generator", "opm_keep_masks", "opm_theta"]


def _opm_probability_compute(scores: Mapping[str, float], q_base: float, lam: float) -> dict[str, float]:
    """``q_m = clip(q_base (1 + lam tanh(rho_m - 1)), 0, 1)`` for ``rho_m > 1``, else 0; unchecked."""
    ratios = _ogm_ratio_compute(scores)
    return {
        m: min(max(q_base * (1.0 + lam * math.tanh(r - 1.0)), 0.0), 1.0) if r > 1.0 else 0.0 for m, r in ratios.items()
    }


def opm_drop_probabilities(
    scores: Mapping[str, float | Tensor], q_base: float = 0.5, lam: float = 0.5
) -> dict[str, float]:
    """Per-modality drop probability ``q_m`` from the OGM-GE scores.

    ``rho_m = S_m / mean_{j != m} S_j`` (``+inf`` if the others are all 0 and ``S_m > 0``, 1 for ``0 / 0``), and
    ``q_m = clip(q_base * (1 + lam * tanh(rho_m - 1)), 0, 1)`` if ``rho_m > 1``, else 0. The weakest modality always
    has ``q = 0``, so no sample ever loses every modality; a tie drops nothing.

    Args:
        scores: modality -> score ``S_m`` (finite, >= 0); the mapping order is the modality order.
        q_base: base drop probability, in ``[0, 1]``. Official 0.5.
        lam: growth of ``q`` with the discrepancy, finite and >= 0. Official 0.5.

    Returns:
        modality -> ``q_m`` in ``[0, 1]``.

    Raises:
        ValueError: fewer than 2 modalities, a negative or non-finite score, ``q_base`` outside ``[0, 1]`` or a
            negative or non-finite ``lam``.

    Example::

        >>> {m: round(q, 6) for m, q in opm_drop_probabilities({"audio": 20.0, "visual": 10.0}).items()}
        {'audio': 0.690399, 'visual': 0.0}
    """
    values = check_scores("OPM", scores)
    check_float("q_base", q_base, 0, 1)
    check_float("lam", lam, 0)
    return _opm_probability_compute(values, float(q_base), float(lam))


def opm_theta(drop_probabilities: Mapping[str, float], feature_dims: Mapping[str, int] | None = None) -> float:
    """The expected dropped fraction of the concatenated features, ``theta = sum_m D_m q_m / sum_m D_m``.

    Args:
        drop_probabilities: modality -> ``q_m`` in ``[0, 1]``.
        feature_dims: modality -> feature width ``D_m >= 1`` (same keys); None weighs every modality equally.

    Returns:
        theta in ``[0, 1)``.

    Raises:
        ValueError: the keys differ, a width below 1, a ``q`` outside ``[0, 1]``, or a theta of 1 or more (every
            modality dropped for sure: nothing would be left to rescale).

    Example::

        >>> opm_theta({"audio": 0.6, "visual": 0.0}, {"audio": 512, "visual": 512})
        0.3
    """
    dims = dict.fromkeys(drop_probabilities, 1) if feature_dims is None else dict(feature_dims)
    if set(dims) != set(drop_probabilities):
        raise ValueError(
            f"The keys of `feature_dims` {sorted(dims)} differ from the modalities {sorted(drop_probabilities)}."
        )
    bad_dims = {m: d for m, d in dims.items() if isinstance(d, bool) or not isinstance(d, int) or d < 1}
    if bad_dims:
        raise ValueError(f"Feature widths must be ints >= 1, got {bad_dims}.")
    bad_q = {m: q for m, q in drop_probabilities.items() if not 0.0 <= q <= 1.0}
    if bad_q:
        raise ValueError(f"Drop probabilities must lie in [0, 1], got {bad_q}.")
    theta = sum(dims[m] * q for m, q in drop_probabilities.items()) / sum(dims.values())
    if theta >= 1.0:
        raise ValueError(f"theta = {theta!r} >= 1: every modality would be dropped for sure; keep one q below 1.")
    return theta


def opm_generator(seed: int, global_step: int, micro_index: int) -> numpy.random.Generator:
    """The gate and mask generator of one micro-batch: ``numpy.random.default_rng([seed, step, micro_index])``.

    A function of its arguments only: identical on every rank, and exact after a resume.

    Raises:
        ValueError / TypeError: an argument that is not an int >= 0.

    Example::

        >>> round(float(opm_generator(0, 0, 0).random()), 6)
        0.636962
    """
    for name, value in (("seed", seed), ("global_step", global_step), ("micro_index", micro_index)):
        check_int(name, value, 0)
    return numpy.random.default_rng([seed, global_step, micro_index])


def _opm_gate(generator: numpy.random.Generator, p_exe: float) -> bool:
    """One draw ``u``: the drop is executed iff ``u >= 1 - p_exe`` (the official comparison)."""
    return bool(generator.random() >= 1.0 - p_exe)


def _opm_masks(
    drop_probabilities: Mapping[str, float],
    batch_size: int,
    generator: numpy.random.Generator,
    world_size: int,
    rank: int,
) -> dict[str, Tensor]:
    """Keep masks ``(B,)`` of one rank: ``U[i W + r, m] < 1 - q_m`` with ``U`` of shape ``(W B, M)``."""
    draws = generator.random((world_size * batch_size, len(drop_probabilities)))[rank::world_size]
    keep = torch.from_numpy(draws < 1.0 - numpy.array(list(drop_probabilities.values()), dtype=numpy.float64))
    return dict(zip(drop_probabilities, keep.T.contiguous().unbind(), strict=True))


def opm_keep_masks(
    drop_probabilities: Mapping[str, float],
    batch_size: int,
    p_exe: float,
    generator: numpy.random.Generator,
    world_size: int = 1,
    rank: int = 0,
) -> tuple[bool, dict[str, Tensor]]:
    """The gate and the per-sample keep masks of one micro-batch on one rank.

    Draws ``u`` first; the drop is executed iff ``u >= 1 - p_exe``. Only if executed and some ``q_m > 0``, draws
    ``U`` of shape ``(world_size * batch_size, M)``; rank ``r``'s sample ``i`` uses row ``i * world_size + r`` and keeps
    modality ``m`` iff ``U[row, m] < 1 - q_m``. With an interleaved sampler (rank ``r`` holds samples ``r, r + W, ...``)
    ``W`` ranks of batch ``B`` draw the masks of one process with batch ``W B``.

    Args:
        drop_probabilities: modality -> ``q_m`` in ``[0, 1]``.
        batch_size: the rank's batch size, >= 1.
        p_exe: probability that the drop is executed, in ``[0, 1]``.
        generator: e.g. :func:`opm_generator` ``(seed, global_step, micro_index)``.
        world_size: number of ranks, >= 1.
        rank: this rank, in ``[0, world_size)``.

    Returns:
        ``executed`` and modality -> CPU bool tensor ``(B,)``, True = keep (all True when nothing is dropped).

    Raises:
        ValueError: ``p_exe`` outside ``[0, 1]``, ``batch_size < 1``, ``world_size < 1``, ``rank`` outside
            ``[0, world_size)``, or a ``q`` outside ``[0, 1]``.

    Example::

        >>> executed, keep = opm_keep_masks({"audio": 0.69, "visual": 0.0}, 3, 0.7, opm_generator(0, 1, 0))
        >>> executed, keep["visual"].tolist()
        (True, [True, True, True])
    """
    check_float("p_exe", p_exe, 0, 1)
    check_int("batch_size", batch_size, 1)
    check_int("world_size", world_size, 1)
    check_int("rank", rank, 0, world_size)
    bad = {m: q for m, q in drop_probabilities.items() if not 0.0 <= q <= 1.0}
    if bad:
        raise ValueError(f"Drop probabilities must lie in [0, 1], got {bad}.")
    executed = _opm_gate(generator, p_exe)
    if executed and any(q > 0 for q in drop_probabilities.values()):
        return executed, _opm_masks(drop_probabilities, batch_size, generator, world_size, rank)
    return executed, {m: torch.ones(batch_size, dtype=torch.bool) for m in drop_probabilities}


def _opm_scale(keep: Tensor, theta: float, like: Tensor) -> Tensor:
    """``keep / (1 - theta)`` shaped ``(B, 1, ..., 1)`` to broadcast over ``like``, on its device and dtype."""
    shape = (keep.shape[0],) + (1,) * (like.ndim - 1)
    return (keep.to(torch.float64) / (1.0 - theta)).to(device=like.device, dtype=like.dtype).view(shape)


def opm_drop_features(features: Mapping[str, Tensor], keep: Mapping[str, Tensor], theta: float) -> dict[str, Tensor]:
    """``f_m * keep_m / (1 - theta)``: the dropped and rescaled features (differentiable in ``f_m``, theta constant).

    Args:
        features: modality -> features with the batch as dimension 0.
        keep: modality -> bool or 0/1 tensor ``(B,)`` (same keys), broadcast over the trailing dimensions.
        theta: the expected dropped fraction, in ``[0, 1)`` (:func:`opm_theta`).

    Returns:
        modality -> the features with dropped samples zeroed and every sample scaled by ``1 / (1 - theta)``.

    Raises:
        ValueError: the keys differ, a keep length differs from dimension 0 of its features, or theta outside
            ``[0, 1)``.

    Example::

        >>> f = {"a": torch.ones(2, 3), "v": torch.ones(2, 3)}
        >>> keep = {"a": torch.tensor([True, False]), "v": torch.tensor([True, True])}
        >>> opm_drop_features(f, keep, 0.25)["a"][:, 0].tolist()
        [1.3333333730697632, 0.0]
    """
    if set(features) != set(keep):
        raise ValueError(f"The keys of `keep` {sorted(keep)} differ from those of `features` {sorted(features)}.")
    check_float("theta", theta, 0, 1, max_open=True)
    for m, f in features.items():
        if keep[m].ndim != 1 or f.ndim < 1 or keep[m].shape[0] != f.shape[0]:
            raise ValueError(
                f"The keep mask of {m!r} has shape {tuple(keep[m].shape)}; it must be (B,) with B = "
                f"{f.shape[0] if f.ndim else None}, dimension 0 of its features {tuple(f.shape)}."
            )
    return {m: f * _opm_scale(keep[m], theta, f) for m, f in features.items()}
