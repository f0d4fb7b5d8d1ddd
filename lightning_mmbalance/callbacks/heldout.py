"""Held-out data for the epoch-level methods: loader views, eval passes, feature extraction, isolated randomness.

Gradient Blending, Diagnosing & Re-learning and the monitor's probes measure the model on the training and validation
data between training steps. Everything here leaves the fit untouched: views are new DataLoaders over the same
dataset (the original loader's sampler and generator are never iterated), eval passes restore every ``training``
flag, and the global random state is restored after an isolated block.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, Sampler

from lightning_mmbalance.contract import ForwardFn, run_forward

__all__ = [
    "collect_features",
    "detached_copy",
    "eval_mode",
    "extract_features",
    "isolated_rng",
    "loader_view",
    "train_loader",
    "validation_loader",
]


def train_loader(trainer: pl.Trainer, method: str) -> DataLoader:
    """The fit's training DataLoader.

    Raises:
        MisconfigurationException: the training data is not one DataLoader (e.g. a dict of loaders).
    """
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader):
        raise MisconfigurationException(
            f"{method} needs the training data as one DataLoader, got {type(loader).__name__}."
        )
    return loader


def validation_loader(trainer: pl.Trainer, method: str) -> DataLoader:
    """The first validation DataLoader of the fit, set up if Lightning has not built it yet.

    Raises:
        MisconfigurationException: there is none (no ``val_dataloader`` / ``validation_step``, or
            ``limit_val_batches=0``).
    """
    message = (
        f"{method} needs a held-out validation loader (val_dataloader) to measure generalisation; never pass the "
        "test set. Give the module a `validation_step` and the Trainer a `val_dataloaders` (or the datamodule a "
        "`val_dataloader`), with `limit_val_batches` > 0."
    )
    if trainer.limit_val_batches == 0:
        raise MisconfigurationException(message)
    # Lightning builds the validation loaders lazily, before the first validation run; there is no public way to ask
    # for them earlier, so the validation loop is asked to set them up (it does nothing if they already exist).
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    if val_loop._combined_loader is None:
        val_loop.setup_data()
    combined = val_loop._combined_loader
    loaders = list(combined.flattened) if combined is not None else []
    if not loaders or not isinstance(loaders[0], DataLoader):
        raise MisconfigurationException(message)
    return loaders[0]


class _ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of ``order`` (no padding, so sums over ranks count each sample once)."""

    def __init__(self, order: Sequence[int], rank: int, world: int) -> None:
        self.indices = list(order)[rank::world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def loader_view(
    loader: DataLoader, trainer: pl.Trainer, *, shuffle_seed: int | None = None, indices: Sequence[int] | None = None
) -> DataLoader:
    """A new DataLoader over ``loader.dataset`` with the same batch size, collate function and workers.

    The order is sequential, or a permutation drawn from ``shuffle_seed``; ``indices`` restricts it to a subset.
    Under DDP each rank takes every ``world_size``-th sample of that order. ``drop_last`` is off, and iterating the
    view never touches the original loader's sampler or generator. An ``IterableDataset`` is returned as is.
    """
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        return loader
    order = list(range(len(dataset))) if indices is None else list(indices)  # type: ignore[arg-type]
    if shuffle_seed is not None:
        perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
        order = [order[i] for i in perm]
    return DataLoader(
        dataset,
        batch_size=loader.batch_size or 1,
        sampler=_ShardSampler(order, trainer.global_rank, trainer.world_size),
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


@contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Lightning's ``isolate_rng`` with torch, numpy and ``random`` seeded from ``seed`` inside."""
    with isolate_rng(include_cuda=torch.cuda.is_available()):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        yield


@contextmanager
def eval_mode(module: nn.Module, grad: bool = False) -> Iterator[None]:
    """``module.eval()`` and ``torch.no_grad()`` (unless ``grad``) inside; every ``training`` flag restored on exit."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def detached_copy(pl_module: pl.LightningModule) -> pl.LightningModule:
    """A deep copy of the module that does not copy (and is not attached to) its Trainer, and runs eagerly.

    A module compiled in place (``module.compile()``, or Lightning's unwrapping of ``torch.compile(model)``) keeps its
    compiled entry points as functions bound to the *original* module, which a deep copy shares: the copy would run
    (and train) the original. The copy drops them and runs its own eager code; compiled submodules
    (``torch.compile(encoder)``) copy correctly and stay compiled.
    """
    duplicate = copy.deepcopy(pl_module, memo={id(pl_module.trainer): None})
    for sub in duplicate.modules():
        if getattr(sub, "_compiled_call_impl", None) is not None:
            sub._compiled_call_impl = None
    if getattr(duplicate, "_compiler_ctx", None) is not None:
        for name in ("forward", "training_step", "validation_step", "test_step", "predict_step"):
            duplicate.__dict__.pop(name, None)
        duplicate._compiler_ctx = None
    return duplicate


def collect_features(
    module: nn.Module,
    batches: Iterable[object],
    modalities: Sequence[str],
    forward_fn: ForwardFn | None,
    method: str,
) -> tuple[dict[str, Tensor], Tensor, int]:
    """Encoder features (``MultimodalOutput.features``), labels and class count of the given batches, in order.

    Runs under the caller's mode and precision context; half precision is upcast to float32, float64 kept.

    Raises:
        ValueError: a modality's features are missing or not ``(B, D)``.
    """
    feats: dict[str, list[Tensor]] = {m: [] for m in modalities}
    labels: list[Tensor] = []
    classes = 0
    for batch in batches:
        output = run_forward(forward_fn, module, batch)
        classes = output.logits.shape[1]
        for m in modalities:
            f = output.features.get(m)
            if not isinstance(f, Tensor) or f.ndim != 2:
                got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise ValueError(f"{method} needs `MultimodalOutput.features[{m!r}]` as a (B, D) tensor, got {got}.")
            feats[m].append(f.detach() if f.dtype == torch.float64 else f.detach().float())
        labels.append(output.targets.detach())
    return {m: torch.cat(v) for m, v in feats.items()}, torch.cat(labels), classes


def extract_features(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    view: DataLoader,
    modalities: Sequence[str],
    forward_fn: ForwardFn | None,
    method: str,
) -> tuple[dict[str, Tensor], Tensor, int]:
    """:func:`collect_features` over a view in eval mode, no grad and the trainer's precision, gathered over ranks.

    Under DDP every rank passes its shard of ``view`` (see :func:`loader_view`) and the shards are all-gathered back
    into the view's order, so every rank returns the same CPU tensors.
    """
    batches = (trainer.strategy.batch_to_device(batch) for batch in view)
    with eval_mode(module), trainer.precision_plugin.forward_context():
        local, local_y, classes = collect_features(module, batches, modalities, forward_fn, method)
    if trainer.world_size > 1:
        local = {m: _gather_in_order(trainer, f) for m, f in local.items()}
        local_y = _gather_in_order(trainer, local_y)
    return {m: v.cpu() for m, v in local.items()}, local_y.cpu(), classes


def _gather_in_order(trainer: pl.Trainer, local: Tensor) -> Tensor:
    """All-gather per-rank shards (rank r holds positions r, r + W, ...) and restore the global order."""
    world = trainer.world_size
    counts = trainer.strategy.all_gather(torch.tensor([local.shape[0]], device=local.device)).flatten().tolist()
    longest = max(counts)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    stacked = trainer.strategy.all_gather(padded)  # (world, longest, ...)
    interleaved = stacked.transpose(0, 1).reshape(world * longest, *local.shape[1:])
    return interleaved[[k * world + r for k in range(longest) for r in range(world) if k < counts[r]]]
