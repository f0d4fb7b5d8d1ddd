"""Argument checks with one message pattern: `name` must be <the accepted range>, got <the value>.

A wrong type raises ``TypeError``; a value of the right type outside the accepted range raises ``ValueError``.
Every layer of the package may import this module (it imports nothing from the package).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_class_logits",
    "check_float",
    "check_int",
    "check_scores",
    "check_window",
]


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _interval(minimum: float | None, maximum: float | None, min_open: bool, max_open: bool) -> str:
    if maximum is None:
        return f"{'>' if min_open else '>='} {_number(minimum)}" if minimum is not None else ""
    if minimum is None:
        return f"{'<' if max_open else '<='} {_number(maximum)}"
    return f"in {'(' if min_open else '['}{_number(minimum)}, {_number(maximum)}{')' if max_open else ']'}"


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> None:
    """Check that ``value`` is an int (not a bool) in ``[minimum, maximum)`` (either bound optional).

    Raises:
        TypeError: ``value`` is not an int.
        ValueError: ``value`` is outside the range.
    """
    accepted = f"an int {_interval(minimum, maximum, False, True)}".rstrip()
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be {accepted}, got {value!r}.")
    if (minimum is not None and value < minimum) or (maximum is not None and value >= maximum):
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}.")


def check_float(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    min_open: bool = False,
    max_open: bool = False,
) -> None:
    """Check that ``value`` is a finite real number within the bounds (closed unless ``min_open`` / ``max_open``).

    Raises:
        TypeError: ``value`` is not an int or float (bools are refused).
        ValueError: ``value`` is not finite or outside the range.
    """
    accepted = f"a finite float {_interval(minimum, maximum, min_open, max_open)}".rstrip()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"`{name}` must be {accepted}, got {value!r}.")
    below = minimum is not None and (value < minimum or (min_open and value == minimum))
    above = maximum is not None and (value > maximum or (max_open and value == maximum))
    if not math.isfinite(value) or below or above:
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """Check that ``value`` is a bool.

    Raises:
        TypeError: it is not.
    """
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r}.")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Check that ``value`` is one of ``choices``.

    Raises:
        ValueError: it is not.
    """
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}.")


def check_callable(name: str, value: Any, signature: str, *, optional: bool = True) -> None:
    """Check that ``value`` is callable (or None when ``optional``); ``signature`` describes what it must accept.

    Raises:
        TypeError: it is not.
    """
    if (value is None and optional) or callable(value):
        return
    raise TypeError(f"`{name}` must be callable {signature}, got {value!r}.")


def check_window(modulation_starts: Any, modulation_ends: Any) -> None:
    """A modulation window: ``modulation_starts`` an int >= 0, ``modulation_ends`` None or an int >= the start.

    Raises:
        ValueError / TypeError: as :func:`check_int`, naming the argument.
    """
    check_int("modulation_starts", modulation_starts, 0)
    if modulation_ends is not None:
        check_int("modulation_ends", modulation_ends, modulation_starts)


def check_class_logits(logits: Mapping[str, Tensor], targets: Tensor, what: str) -> tuple[int, int]:
    """Check per-modality ``(B, C)`` tensors (one common ``B`` and ``C``) and ``(B,)`` integer targets in ``[0, C)``.

    Returns:
        ``(B, C)``.

    Raises:
        ValueError: no tensor, a tensor of another shape, or malformed targets (``what`` names the tensors).
    """
    shapes = {m: tuple(z.shape) for m, z in logits.items()}
    if not shapes or any(len(s) != 2 for s in shapes.values()) or len(set(shapes.values())) != 1:
        raise ValueError(f"Every {what} must be (B, C) with one common B and C, got {shapes}.")
    batch, classes = next(iter(shapes.values()))
    if targets.ndim != 1 or targets.shape[0] != batch or targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(
            f"`targets` must be a 1-D integer tensor of length {batch}, got {targets.dtype} of shape "
            f"{tuple(targets.shape)}."
        )
    if batch and bool((targets.min() < 0) | (targets.max() >= classes)):
        raise ValueError(f"`targets` must lie in [0, {classes}), got [{int(targets.min())}, {int(targets.max())}].")
    return batch, classes


def check_scores(method: str, scores: Mapping[str, Any]) -> dict[str, float]:
    """Per-modality scores as floats: at least two modalities, each finite and >= 0.

    Raises:
        ValueError: fewer than 2 modalities, or a negative or non-finite score (``method`` names the caller).
    """
    values = {m: float(s) for m, s in scores.items()}
    if len(values) < 2:
        raise ValueError(f"{method} needs at least 2 modalities, got {list(values)}.")
    bad = {m: s for m, s in values.items() if not math.isfinite(s) or s < 0}
    if bad:
        raise ValueError(f"Scores must be finite and >= 0, got {bad}.")
    return values
