"""``multimodal_loss``: the one call that connects a module's ``training_step`` to the attached callbacks.

It sits above the contract's data types and the callbacks' base classes: it validates the module's output, asks the
attached balancing callback (at most one sets weights) for the loss weights, and hands every attached callback the
micro-batch's :class:`~lightning_mmbalance.contract.StepRecord`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mmbalance.callbacks.base import BalancingCallback, MultimodalCallback
from lightning_mmbalance.contract import MultimodalOutput, StepRecord, validate_output

__all__ = ["Criterion", "multimodal_loss"]

Criterion = Callable[[Tensor, Tensor], Tensor]


def multimodal_loss(module: nn.Module, output: MultimodalOutput, criterion: Criterion = F.cross_entropy) -> Tensor:
    """The training loss of a multimodal module, weighted as the attached balancing callback asks.

    Return its value from ``training_step``; that one call is the whole integration with the callbacks. It validates
    ``output`` (once per fit when a callback of the package is attached, else the free checks at every step), computes
    the fused loss ``L_f`` and, in training, every unimodal loss ``L_m``, and returns
    ``w_f * L_f + sum_m w_m * L_m``. The weights default to ``w_f = 1``, ``w_m = 0``; a loss-weighting callback
    (``MMPareto``, ``ARL``, ``GradientBlending``) sets them. Outside training or outside a Trainer it is just ``L_f``.

    In training, a term whose weight is 0 stays in the graph multiplied by 0: every parameter that can receive a
    gradient receives one (possibly zero) at every step, which DDP with ``find_unused_parameters=False`` (Lightning's
    default) requires, also when a weight becomes 0 in the middle of a run or a separate unimodal head is not trained.

    Args:
        module: the LightningModule (``self`` in ``training_step``).
        output: the module's :class:`~lightning_mmbalance.MultimodalOutput` for the batch.
        criterion: ``criterion(logits, targets) -> scalar``, used for the fused and every unimodal loss.

    Returns:
        The scalar loss to return from ``training_step``.

    Raises:
        TypeError: ``output`` is not a MultimodalOutput, or its targets are not integer class indices.
        ValueError: modality keys or shapes disagree with the encoders, or an attached callback lacks what it needs.

    Example::

        def training_step(self, batch, batch_idx):
            output = self(batch)  # a MultimodalOutput
            return multimodal_loss(self, output)
    """
    trainer = getattr(module, "_trainer", None)
    callbacks = [cb for cb in trainer.callbacks if isinstance(cb, MultimodalCallback)] if trainer is not None else []
    if not callbacks or not all(cb.output_checked for cb in callbacks):
        _validate(module, output, callbacks, values=trainer is None or bool(callbacks))
    fused = criterion(output.logits, output.targets)
    if trainer is None or not trainer.training:
        return fused
    unimodal = {m: criterion(z, output.targets) for m, z in output.unimodal_logits.items()}
    weights = {"fused": 1.0, **dict.fromkeys(unimodal, 0.0)}
    for cb in callbacks:
        if isinstance(cb, BalancingCallback) and cb.sets_loss_weights:
            asked = cb.loss_weights(trainer, module)  # type: ignore[arg-type]
            if asked is not None:
                weights.update(asked)
    loss = fused if weights["fused"] == 1.0 else weights["fused"] * fused
    for m, loss_m in unimodal.items():
        loss = loss + weights[m] * loss_m
    record = StepRecord(output=output, fused_loss=fused, unimodal_losses=unimodal, weights=weights, loss=loss)
    for cb in callbacks:
        cb.receive_record(record)
    return loss


def _validate(
    module: nn.Module, output: MultimodalOutput, callbacks: list[MultimodalCallback], *, values: bool
) -> None:
    modalities = next((cb.modalities for cb in callbacks if cb.modalities), None)
    if modalities is None and isinstance(getattr(module, "encoders", None), nn.ModuleDict):
        modalities = tuple(module.encoders)  # type: ignore[arg-type]
    # The target range check synchronises with the device. Callbacks remember that the output was checked, so it runs
    # once per fit with them; in a Trainer without them only the (free) shape and type checks run, at every step.
    validate_output(output, modalities, values=values)
    for cb in callbacks:
        cb.check_output(output)
