"""Late-fusion heads that return the fused logits and every modality's own logits from one call.

The balancing methods compare what each modality alone predicts (its *unimodal logits*) with the fused prediction.
For a late-fusion head these come from the head itself:

- :class:`ConcatFusion`: one ``nn.Linear`` over the concatenated features; the unimodal logits are the weight
  slices applied to each modality's features, with the bias split equally across the modalities (the OGM-GE
  convention, Peng et al., CVPR 2022: the unimodal logits then sum to the fused ones) or kept whole (the ARL
  convention, Wei, Luo & Luo, ICCV 2025: a modality's logits are the head applied with the others' features zeroed).
- :class:`SumFusion`: one ``nn.Linear`` per modality, fused logits = their sum; each branch keeps its own bias.
- :class:`ZeroMaskFusion`: any other head, run once on all features and once per modality with the other
  modalities' features zeroed.

Every head takes the features as a mapping modality -> ``(B, D_m)`` tensor and returns a :class:`FusionOutput`
whose ``unimodal_logits`` follow the head's fixed modality order (the order of ``in_features`` / ``modalities``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mmbalance.utilities.checks import check_choice, check_int

__all__ = ["ConcatFusion", "FusionOutput", "SumFusion", "ZeroMaskFusion"]

BIAS_MODES = ("split", "whole")


class FusionOutput(NamedTuple):
    """Fused and per-modality logits of a fusion head.

    Attributes:
        logits: ``(B, C)`` fused logits.
        unimodal_logits: modality -> ``(B, C)`` logits of what that modality alone predicts, in the head's order.
    """

    logits: Tensor
    unimodal_logits: dict[str, Tensor]


def _check_in_features(in_features: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(in_features, Mapping) or not in_features:
        raise ValueError(f"`in_features` must be a non-empty mapping modality -> feature width, got {in_features!r}.")
    for modality, width in in_features.items():
        if not isinstance(modality, str):
            raise ValueError(f"Modality names in `in_features` must be strings, got {modality!r}.")
        check_int(f"in_features[{modality!r}]", width, 1)
    return dict(in_features)


def _check_keys(features: Mapping[str, Tensor], modalities: Sequence[str], head: str) -> None:
    if set(features) != set(modalities):
        raise ValueError(
            f"{head} expects features for the modalities {list(modalities)}, got {list(features)}. Use the same "
            "modality names as when the head was built."
        )


def _check_widths(features: Mapping[str, Tensor], in_features: Mapping[str, int], head: str) -> None:
    _check_keys(features, tuple(in_features), head)
    batch = next(iter(features.values())).shape[:1]
    for modality, width in in_features.items():
        shape = tuple(features[modality].shape)
        if len(shape) != 2 or shape[1] != width or shape[:1] != batch:
            raise ValueError(
                f"{head}: `features[{modality!r}]` must have shape (B, {width}) with the batch size B of the other "
                f"modalities ({tuple(batch)}), got {shape}."
            )


class _LinearFusion(nn.Module):
    """Shared part of the linear heads: checked ``in_features`` (modality -> width) and the modality order."""

    def __init__(self, in_features: Mapping[str, int], num_classes: int) -> None:
        super().__init__()
        self.in_features = _check_in_features(in_features)
        check_int("num_classes", num_classes, 1)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modality order (of ``in_features``)."""
        return tuple(self.in_features)


class ConcatFusion(_LinearFusion):
    """Concatenation fusion: one ``nn.Linear`` named ``fc`` over the features concatenated in modality order.

    The fused logits are ``fc(cat(features))``. With ``W = [W_1 | ... | W_M]`` the column slices of ``fc.weight``
    belonging to each modality and ``b = fc.bias``, modality ``m`` alone predicts ``z_m = f_m W_m^T + b_m`` with

    - ``bias="split"`` (default): ``b_m = b / M``, the convention of OGM-GE (Peng et al., "Balanced Multimodal
      Learning via On-the-fly Gradient Modulation", CVPR 2022). The unimodal logits sum exactly to the fused logits.
    - ``bias="whole"``: ``b_m = b``, the convention of ARL (Wei, Luo & Luo, "Improving Multimodal Learning via
      Imbalanced Learning", ICCV 2025). ``z_m`` is the head applied to the concatenation
      with every other modality's features replaced by zeros.

    Args:
        in_features: modality -> feature width ``D_m``; its order is the concatenation order.
        num_classes: number of classes ``C``.
        bias: ``"split"`` or ``"whole"``, how the bias enters the unimodal logits.

    Raises:
        ValueError: an empty ``in_features``, a width or ``num_classes`` < 1, or an unknown ``bias``.

    Example::

        fusion = ConcatFusion({"audio": 512, "visual": 512}, num_classes=6)
        out = fusion({"audio": h_a, "visual": h_v})
        out.logits                    # (B, 6), fc(cat([h_a, h_v], dim=1))
        out.unimodal_logits["audio"]  # (B, 6), h_a @ W[:, :512].T + b / 2
    """

    def __init__(self, in_features: Mapping[str, int], num_classes: int, bias: str = "split") -> None:
        super().__init__(in_features, num_classes)
        check_choice("bias", bias, BIAS_MODES)
        self.bias_mode = bias
        self.fc = nn.Linear(sum(self.in_features.values()), num_classes)

    def forward(self, features: Mapping[str, Tensor]) -> FusionOutput:
        """Fuse the features.

        Args:
            features: modality -> ``(B, D_m)`` features, the keys of ``in_features``.

        Returns:
            The fused logits ``fc(cat(features))`` and each modality's weight-slice logits.

        Raises:
            ValueError: the keys differ from ``in_features`` or a shape is not ``(B, D_m)``.
        """
        _check_widths(features, self.in_features, type(self).__name__)
        logits = self.fc(torch.cat([features[m] for m in self.modalities], dim=1))
        bias = self.fc.bias / len(self.in_features) if self.bias_mode == "split" else self.fc.bias
        weights = self.fc.weight.split(list(self.in_features.values()), dim=1)
        unimodal = {m: F.linear(features[m], w, bias) for m, w in zip(self.modalities, weights, strict=True)}
        return FusionOutput(logits, unimodal)


class SumFusion(_LinearFusion):
    """Sum fusion: one ``nn.Linear`` per modality (``fcs``), fused logits = the sum of their outputs.

    Modality ``m`` alone predicts ``z_m = fcs[m](f_m)`` with its own full bias, as in the official OGM-GE code
    (Peng et al., CVPR 2022) since March 2023. The fused logits are ``sum_m z_m``.

    Args:
        in_features: modality -> feature width ``D_m``; its order is the modality order.
        num_classes: number of classes ``C``.

    Raises:
        ValueError: an empty ``in_features`` or a width or ``num_classes`` < 1.

    Example::

        fusion = SumFusion({"audio": 512, "visual": 512}, num_classes=6)
        out = fusion({"audio": h_a, "visual": h_v})
        out.logits  # (B, 6) == fusion.fcs["audio"](h_a) + fusion.fcs["visual"](h_v)
    """

    def __init__(self, in_features: Mapping[str, int], num_classes: int) -> None:
        super().__init__(in_features, num_classes)
        self.fcs = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in self.in_features.items()})

    def forward(self, features: Mapping[str, Tensor]) -> FusionOutput:
        """Fuse the features.

        Args:
            features: modality -> ``(B, D_m)`` features, the keys of ``in_features``.

        Returns:
            The summed logits and each branch's logits.

        Raises:
            ValueError: the keys differ from ``in_features`` or a shape is not ``(B, D_m)``.
        """
        _check_widths(features, self.in_features, type(self).__name__)
        unimodal = {m: fc(features[m]) for m, fc in self.fcs.items()}
        return FusionOutput(torch.stack(list(unimodal.values())).sum(0), unimodal)


class ZeroMaskFusion(nn.Module):
    """Per-modality logits for any fusion head, by zeroing the other modalities' features.

    ``head(features) -> (B, C)`` is the user's fusion, called with a dict modality -> features. The fused logits are
    ``head(features)``; modality ``m`` alone predicts ``head({m: f_m, others: zeros_like})``. This runs the head
    ``M + 1`` times per call, and zeroed features may be out of distribution for the head (e.g. after a ReLU or a
    normalisation they are not what a missing modality looks like), so the unimodal logits are an approximation. For
    a linear head it equals :class:`ConcatFusion` with ``bias="whole"`` (the ARL convention, Wei, Luo & Luo,
    ICCV 2025); prefer :class:`ConcatFusion` or :class:`SumFusion` when they fit.

    Args:
        head: the fusion module, ``head(features: dict[str, Tensor]) -> Tensor`` of shape ``(B, C)``.
        modalities: the modality names, in the order of ``unimodal_logits``.

    Raises:
        TypeError: ``head`` is not an ``nn.Module``.
        ValueError: ``modalities`` is empty, has duplicates or non-string names.

    Example::

        class GatedHead(nn.Module):  # any head over the features of every modality
            def __init__(self) -> None:
                super().__init__()
                self.gate, self.out = nn.Linear(1024, 512), nn.Linear(512, 10)

            def forward(self, features: dict[str, Tensor]) -> Tensor:
                h_a, h_v = features["audio"], features["visual"]
                g = torch.sigmoid(self.gate(torch.cat([h_a, h_v], dim=1)))
                return self.out(g * h_a + (1 - g) * h_v)

        h_a, h_v = torch.randn(4, 512), torch.randn(4, 512)
        fusion = ZeroMaskFusion(GatedHead(), ["audio", "visual"])
        out = fusion({"audio": h_a, "visual": h_v})
        out.unimodal_logits["audio"]  # the head on {"audio": h_a, "visual": zeros_like(h_v)}
    """

    def __init__(self, head: nn.Module, modalities: Sequence[str]) -> None:
        super().__init__()
        if not isinstance(head, nn.Module):
            raise TypeError(f"`head` must be an nn.Module taking a dict modality -> features, got {type(head)!r}.")
        names = tuple(modalities) if isinstance(modalities, Sequence) and not isinstance(modalities, str) else ()
        if not names or len(set(names)) != len(names) or not all(isinstance(m, str) for m in names):
            raise ValueError(
                f"`modalities` must be a non-empty sequence of distinct modality names, got {modalities!r}."
            )
        self.head = head
        self.modalities = names

    def forward(self, features: Mapping[str, Tensor]) -> FusionOutput:
        """Run the head on all features, then once per modality with the others zeroed.

        Args:
            features: modality -> ``(B, D_m)`` features, the keys of ``modalities``.

        Returns:
            The head's fused logits and each modality's zero-masked logits.

        Raises:
            ValueError: the keys differ from ``modalities``.
            TypeError: the head does not return a tensor.
        """
        _check_keys(features, self.modalities, type(self).__name__)
        ordered = {m: features[m] for m in self.modalities}
        zeros = {m: torch.zeros_like(f) for m, f in ordered.items()}
        logits = self._run(ordered)
        unimodal = {m: self._run({**zeros, m: ordered[m]}) for m in self.modalities}
        return FusionOutput(logits, unimodal)

    def _run(self, features: dict[str, Tensor]) -> Tensor:
        out = self.head(features)
        if not isinstance(out, Tensor):
            raise TypeError(f"The head of ZeroMaskFusion must return a (B, C) tensor, got {type(out).__name__}.")
        return out
