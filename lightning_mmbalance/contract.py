"""The contract between a user's LightningModule and the balancing callbacks.

A module integrates with every callback of this package in two places:

1. It says which parameters belong to which modality, with an ``nn.ModuleDict`` named ``encoders`` (or the callbacks'
   ``encoders=`` argument, a mapping of modality name to dotted attribute path).
2. Its ``training_step`` returns ``multimodal_loss(self, output)``, where ``output`` is a :class:`MultimodalOutput`.

``multimodal_loss`` validates the output, combines the fused and unimodal losses with the weights the attached
callbacks ask for, and records the step so that the callbacks can read it in their hooks.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_mmbalance.callbacks.base import BalancingCallback

__all__ = ["MultimodalOutput", "StepRecord", "multimodal_loss", "resolve_encoders", "validate_output"]

Criterion = Callable[[Tensor, Tensor], Tensor]


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

        output = MultimodalOutput(
            logits=fused, unimodal_logits={"audio": z_a, "visual": z_v}, targets=y,
            features={"audio": h_a, "visual": h_v},
        )
    """

    logits: Tensor
    unimodal_logits: Mapping[str, Tensor]
    targets: Tensor
    features: Mapping[str, Tensor] = field(default_factory=dict)


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
        TypeError: ``output`` is not a MultimodalOutput, or the targets are not integer class indices.
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
        if feat.ndim < 1 or feat.shape[0] != batch:
            raise ValueError(
                f"`features[{modality!r}]` has shape {tuple(feat.shape)}; its first dimension must be the batch "
                f"size {batch}."
            )
    if values and targets.numel() and bool((targets.min() < 0) | (targets.max() >= classes)):
        lo, hi = int(targets.min()), int(targets.max())
        raise ValueError(f"`MultimodalOutput.targets` must lie in [0, {classes}), got values in [{lo}, {hi}].")


_VALIDATED: weakref.WeakSet[pl.Trainer] = weakref.WeakSet()


def _attached_callbacks(module: nn.Module) -> tuple[pl.Trainer | None, list[BalancingCallback]]:
    from lightning_mmbalance.callbacks.base import BalancingCallback

    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return None, []
    return trainer, [cb for cb in trainer.callbacks if isinstance(cb, BalancingCallback)]


def multimodal_loss(module: nn.Module, output: MultimodalOutput, criterion: Criterion = F.cross_entropy) -> Tensor:
    """The training loss of a multimodal module, weighted as the attached balancing callbacks ask.

    Return its value from ``training_step``; that one call is the whole integration with the callbacks. It validates
    ``output`` (once per fit inside a Trainer), computes the fused loss ``L_f`` and, when a balancing callback is
    attached, the unimodal losses ``L_m``, and returns ``w_f * L_f + sum_m w_m * L_m`` (defaults ``w_f = 1``,
    ``w_m = 0``). Outside training, outside a Trainer, or with no balancing callback attached it is just ``L_f``.

    Args:
        module: the LightningModule (``self`` in ``training_step``).
        output: the module's :class:`MultimodalOutput` for the batch.
        criterion: ``criterion(logits, targets) -> scalar``, used for the fused and every unimodal loss.

    Returns:
        The scalar loss to return from ``training_step``.

    Example::

        def training_step(self, batch, batch_idx):
            output = self(batch)  # a MultimodalOutput
            return multimodal_loss(self, output)
    """
    trainer, callbacks = _attached_callbacks(module)
    training = trainer is not None and trainer.training
    if trainer is None or trainer not in _VALIDATED:
        modalities = next((cb.modalities for cb in callbacks if cb.modalities), None)
        if modalities is None and isinstance(getattr(module, "encoders", None), nn.ModuleDict):
            modalities = tuple(module.encoders)
        validate_output(output, modalities)
        for cb in callbacks:
            cb._check_output(output)
        if training:
            _VALIDATED.add(trainer)
    fused = criterion(output.logits, output.targets)
    if not training or not callbacks:
        return fused
    unimodal = {m: criterion(z, output.targets) for m, z in output.unimodal_logits.items()}
    weights = {"fused": 1.0, **dict.fromkeys(unimodal, 0.0)}
    for cb in callbacks:
        asked = cb.loss_weights(trainer, module)
        if asked is not None:
            weights.update(asked)
    loss = fused if weights["fused"] == 1.0 else weights["fused"] * fused
    for m, loss_m in unimodal.items():
        if weights[m] != 0.0:
            loss = loss + weights[m] * loss_m
    record = StepRecord(output=output, fused_loss=fused, unimodal_losses=unimodal, weights=weights, loss=loss)
    for cb in callbacks:
        cb._receive_record(record)
    return loss
