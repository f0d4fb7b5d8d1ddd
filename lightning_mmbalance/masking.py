"""Masked evaluation, "the model without modality m", by zeroing encoder outputs whatever the batch looks like.

Masked accuracy, utilisation and Shapley values need the module's prediction with some modalities absent. The
package never looks inside a batch (tuples, dicts and dataclasses are all common): it replaces the *output* of each
masked modality's encoder by zeros with a forward hook, runs the module's ordinary forward (eagerly, if it is
compiled), and removes the hooks. An output that is a structure of tensors (a Hugging Face ``ModelOutput``, a dict,
tuple, named tuple, list or dataclass, nested in any way) keeps its structure and class, with every tensor in it
zeroed and every other value (None, numbers, strings) kept.
The fusion head then sees zero features, exactly as :class:`~lightning_mmbalance.ZeroMaskFusion` and
BalanceBenchmark do. A module that defines ``masked_forward(batch, masked: frozenset[str]) -> MultimodalOutput``
overrides this.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_mmbalance.contract import ForwardFn, MultimodalOutput, run_forward
from lightning_mmbalance.utilities.tree import map_tensors, tensor_leaves

__all__ = ["MaskingError", "masked_forward", "zeroed_encoders"]


class MaskingError(TypeError):
    """Zeroing an encoder's output cannot mask this module (the output holds no tensor, or the encoder never runs)."""


@contextmanager
def zeroed_encoders(encoders: Mapping[str, nn.Module], masked: Collection[str]) -> Iterator[set[str]]:
    """Inside the block, every encoder of a modality in ``masked`` returns its output with every tensor zeroed.

    Yields the set of masked modalities whose encoder actually ran, so that a caller can tell a module that bypasses
    its encoders' ``__call__`` (and so their hooks). The hooks are removed on exit, also after an error.

    Raises:
        MaskingError: a masked encoder returned something without any tensor in it.
        KeyError: ``masked`` names a modality that is not in ``encoders``.
    """
    unknown = set(masked) - set(encoders)
    if unknown:
        raise KeyError(f"Cannot mask unknown modalities {sorted(unknown)}; the encoders are {list(encoders)}.")
    called: set[str] = set()

    def hook_for(modality: str) -> Any:
        def zero_output(module: nn.Module, args: Any, output: Any) -> Any:
            if not tensor_leaves(output):
                raise MaskingError(
                    f"Cannot mask modality {modality!r}: its encoder ({type(module).__name__}) returns a "
                    f"{type(output).__name__} in which no tensor was found (tensors are looked for in tensors, dicts, "
                    "lists, tuples, named tuples, dataclasses and Hugging Face ModelOutputs, nested in any way), so "
                    "nothing can be replaced by zeros. Return one of these, register the class with "
                    "`torch.utils._pytree.register_pytree_node`, or give the module a method "
                    "`masked_forward(batch, masked: frozenset[str]) -> MultimodalOutput`."
                )
            called.add(modality)
            return map_tensors(torch.zeros_like, output)

        return zero_output

    handles = [encoders[m].register_forward_hook(hook_for(m)) for m in masked]
    try:
        yield called
    finally:
        for handle in handles:
            handle.remove()


def _eager() -> contextlib.AbstractContextManager[None]:
    """Run compiled code eagerly inside (a graph compiled for the whole module would skip the encoders' hooks)."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def masked_forward(
    module: nn.Module,
    batch: Any,
    masked: Collection[str],
    encoders: Mapping[str, nn.Module],
    forward_fn: ForwardFn | None = None,
) -> MultimodalOutput:
    """The module's output on ``batch`` with the encoders of the ``masked`` modalities returning zeros.

    Uses ``module.masked_forward(batch, frozenset(masked))`` when the module defines it; otherwise zeroes every tensor
    of the masked encoders' outputs with :func:`zeroed_encoders` around ``forward_fn(module, batch)`` (or
    ``module(batch)``). Zero features may be out of distribution for the fusion head; read the results as indicators.

    Raises:
        MaskingError: a masked encoder's output holds no tensor, or a masked encoder was not called through its
            ``__call__`` during the forward (its hook never ran, so nothing was masked).

    Example::

        class AudioVisual(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.audio_net, self.visual_net, self.head = nn.Linear(6, 8), nn.Linear(4, 8), nn.Linear(16, 3)

            def forward(self, batch: tuple[torch.Tensor, ...]) -> MultimodalOutput:
                audio, visual, y = batch
                logits = self.head(torch.cat([self.audio_net(audio), self.visual_net(visual)], dim=1))
                return MultimodalOutput(logits=logits, unimodal_logits={}, targets=y)

        model = AudioVisual()
        batch = (torch.randn(16, 6), torch.randn(16, 4), torch.randint(0, 3, (16,)))
        out = masked_forward(model, batch, {"audio"}, {"audio": model.audio_net, "visual": model.visual_net})
        accuracy_without_audio = (out.logits.argmax(1) == out.targets).float().mean()
    """
    own = getattr(module, "masked_forward", None)
    if callable(own):
        return own(batch, frozenset(masked))
    with _eager(), zeroed_encoders(encoders, masked) as called:
        output = run_forward(forward_fn, module, batch)
    skipped = set(masked) - called
    if skipped:
        raise MaskingError(
            f"Cannot mask modalities {sorted(skipped)}: their encoders did not run through `__call__` in the forward "
            "(a direct `.forward(...)` call or a functional call skips the forward hooks that zero their output). "
            "Call the encoder modules as `encoder(x)`, or give the module a method "
            "`masked_forward(batch, masked: frozenset[str]) -> MultimodalOutput`."
        )
    return output
