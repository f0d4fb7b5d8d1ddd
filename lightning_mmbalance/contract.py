"""The contract between a user's LightningModule and the callbacks: the data types, encoder resolution, checks.

A module integrates with every callback of this package in two places:

1. It says which parameters belong to which modality, with an ``nn.ModuleDict`` named ``encoders`` (or the callbacks'
   ``encoders=`` argument, a mapping of modality name to dotted attribute path), resolved by :func:`resolve_encoders`.
2. Its ``training_step`` returns :func:`~lightning_mmbalance.multimodal_loss` of a :class:`MultimodalOutput`, which
   :func:`validate_output` checks and which is recorded for the callbacks as a :class:`StepRecord`.

This module is a leaf: it imports nothing from the rest of the package.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ForwardFn", "MultimodalOutput", "StepRecord", "resolve_encoders", "run_forward", "validate_output"]


@dataclass
class MultimodalOutput:
    """What a multimodal module's forward returns.

    Args:
        logits: ``(B, C)`` fused prediction.
        unimodal_logits: modality name -> ``(B, C)`` logits of what that modality alone predicts (weight slices of a
            late-fusion head, a separate unimodal head, or the head run with the other modalities zeroed).
        targets: ``(B,)`` integer class indices.
        features: modality name -> ``(B, D)`` encoder outputs. Only some methods need them.

    Example::

        h_a, h_v = torch.randn(8, 16), torch.randn(8, 32)  # the encoders' features of a batch of 8
        z_a, z_v = nn.Linear(16, 3)(h_a), nn.Linear(32, 3)(h_v)  # what each modality alone predicts
        fused, y = z_a + z_v, torch.randint(0, 3, (8,))
        output = MultimodalOutput(
            logits=fused, unimodal_logits={"audio": z_a, "visual": z_v}, targets=y,
            features={"audio": h_a, "visual": h_v},
        )
    """

    logits: Tensor
    unimodal_logits: Mapping[str, Tensor]
    targets: Tensor
    features: Mapping[str, Tensor] = field(default_factory=dict)


ForwardFn = Callable[[nn.Module, Any], MultimodalOutput]
"""``(module, batch) -> MultimodalOutput``, for modules whose ``forward`` has another signature."""


def run_forward(forward_fn: ForwardFn | None, module: nn.Module, batch: Any) -> MultimodalOutput:
    """``forward_fn(module, batch)``, or ``module(batch)`` when ``forward_fn`` is None."""
    return forward_fn(module, batch) if forward_fn is not None else module(batch)


@dataclass
class StepRecord:
    """What ``multimodal_loss`` recorded for one training micro-batch; read by the callbacks' hooks.

    Attributes:
        output: the module's output for this micro-batch.
        fused_loss: ``L_f``, the criterion on the fused logits.
        unimodal_losses: modality -> ``L_m`` (empty when the output has no unimodal logits).
        weights: the loss weights used, ``"fused"`` and one entry per modality.
        loss: the returned loss, ``w_f * L_f + sum_m w_m * L_m``.
    """

    output: MultimodalOutput
    fused_loss: Tensor
    unimodal_losses: dict[str, Tensor]
    weights: dict[str, float]
    loss: Tensor


def resolve_encoders(
    module: nn.Module, encoders: Mapping[str, str] | None = None, *, require_parameters: bool = True
) -> dict[str, nn.Module]:
    """Find the encoder of every modality.

    Args:
        module: the LightningModule (or any ``nn.Module``).
        encoders: modality -> dotted attribute path (``{"audio": "audio_net", "visual": "backbone.visual"}``). None
            uses ``module.encoders``, which must be an ``nn.ModuleDict`` keyed by modality.
        require_parameters: whether every encoder must have parameters (Gradient Blending only needs the modality
            names and accepts parameter-free encoders).

    Returns:
        An ordered mapping modality -> encoder module; its order is the modality order of every method.

    Raises:
        AttributeError: a path does not exist, or the module has no ``encoders`` attribute.
        TypeError: what was found is not an ``nn.Module`` / ``nn.ModuleDict``.
        ValueError: fewer than two modalities, an encoder without parameters, or encoders sharing parameters.
    """
    name = type(module).__name__
    if encoders is None:
        found = getattr(module, "encoders", None)
        if found is None:
            raise AttributeError(
                f"`{name}` has no `encoders` attribute. Give it an `nn.ModuleDict` named `encoders` (modality -> "
                "encoder), e.g. `self.encoders = nn.ModuleDict({'audio': audio_net, 'visual': visual_net})`, or pass "
                "`encoders={'audio': 'audio_net', 'visual': 'visual_net'}` (modality -> dotted attribute path) "
                "to the callback."
            )
        if not isinstance(found, nn.ModuleDict):
            raise TypeError(
                f"`{name}.encoders` must be an `nn.ModuleDict` keyed by modality, got {type(found).__name__}. "
                "Alternatively pass `encoders={modality: 'dotted.attribute.path'}` to the callback."
            )
        resolved = dict(found.items())
    else:
        resolved = {modality: _get_submodule(module, modality, path) for modality, path in encoders.items()}
    if len(resolved) < 2:
        raise ValueError(f"Balancing needs at least 2 modalities, got {len(resolved)}: {list(resolved)}.")
    owner: dict[int, str] = {}
    for modality, encoder in resolved.items():
        params = list(encoder.parameters())
        if not params and require_parameters:
            raise ValueError(f"The encoder of modality {modality!r} ({type(encoder).__name__}) has no parameters.")
        for p in params:
            other = owner.setdefault(id(p), modality)
            if other != modality:
                raise ValueError(
                    f"The encoders of modalities {other!r} and {modality!r} share parameters; each parameter must "
                    "belong to one modality's encoder."
                )
    return resolved


def _get_submodule(module: nn.Module, modality: str, path: str) -> nn.Module:
    current: Any = module
    walked = type(module).__name__
    for part in path.split("."):
        if not hasattr(current, part):
            raise AttributeError(
                f"Encoder path {path!r} of modality {modality!r} does not exist: `{walked}` has no attribute {part!r}."
            )
        current = getattr(current, part)
        walked = f"{walked}.{part}"
    if not isinstance(current, nn.Module):
        raise TypeError(
            f"Encoder path {path!r} of modality {modality!r} points to a {type(current).__name__}, not an nn.Module."
        )
    return current


def validate_output(
    output: MultimodalOutput, modalities: tuple[str, ...] | None = None, *, values: bool = True
) -> None:
    """Check a :class:`MultimodalOutput` against the contract.

    Args:
        output: the output to check.
        modalities: the expected modality keys (the resolved encoders), or None to skip the key check.
        values: also check that the targets lie in ``[0, C)``, which synchronises with the device.

    Raises:
        TypeError: ``output`` is not a MultimodalOutput, the targets are not integer class indices, or a feature is not
            a tensor.
        ValueError: modality keys differ from the encoders, or shapes disagree.
    """
    if not isinstance(output, MultimodalOutput):
        raise TypeError(
            f"Expected a MultimodalOutput, got {type(output).__name__}. The module's forward must return "
            "`MultimodalOutput(logits=..., unimodal_logits=..., targets=...)`."
        )
    logits, targets = output.logits, output.targets
    if logits.ndim != 2:
        raise ValueError(f"`MultimodalOutput.logits` must be (B, C), got shape {tuple(logits.shape)}.")
    batch, classes = logits.shape
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(
            f"`MultimodalOutput.targets` must be integer class indices (int64), got dtype {targets.dtype}. "
            "Soft or one-hot targets are not supported; pass `targets.argmax(-1)` or the original labels."
        )
    if targets.shape != (batch,):
        raise ValueError(
            f"`MultimodalOutput.targets` must have shape ({batch},) to match the logits {tuple(logits.shape)}, got "
            f"{tuple(targets.shape)}."
        )
    keys = tuple(output.unimodal_logits)
    if modalities is not None and keys and set(keys) != set(modalities):
        raise ValueError(
            f"The modality keys of `MultimodalOutput.unimodal_logits` {sorted(keys)} differ from the encoders' "
            f"modalities {sorted(modalities)}. Use the same names in both."
        )
    for modality, uni in output.unimodal_logits.items():
        if uni.shape != logits.shape:
            raise ValueError(
                f"`unimodal_logits[{modality!r}]` has shape {tuple(uni.shape)}, but the fused logits have "
                f"{tuple(logits.shape)}; every unimodal prediction must be (B, C) like the fused one."
            )
    if modalities is not None and output.features and not set(output.features) <= set(modalities):
        raise ValueError(
            f"The keys of `MultimodalOutput.features` {sorted(output.features)} are not among the encoders' "
            f"modalities {sorted(modalities)}."
        )
    for modality, feat in output.features.items():
        if not isinstance(feat, Tensor):
            raise TypeError(
                f"`features[{modality!r}]` must be a (B, D) tensor, got a {type(feat).__name__}. For an encoder that "
                "returns a structure (a Hugging Face ModelOutput, say), pass the tensor the head reads, e.g. "
                "`out.pooler_output` or `out.last_hidden_state[:, 0]`."
            )
        if feat.ndim < 1 or feat.shape[0] != batch:
            raise ValueError(
                f"`features[{modality!r}]` has shape {tuple(feat.shape)}; its first dimension must be the batch "
                f"size {batch}."
            )
    if values and targets.numel() and bool((targets.min() < 0) | (targets.max() >= classes)):
        lo, hi = int(targets.min()), int(targets.max())
        raise ValueError(f"`MultimodalOutput.targets` must lie in [0, {classes}), got values in [{lo}, {hi}].")
