"""Global reductions that are right for replicated (DDP) and sharded (FSDP2, DTensor) tensors alike.

Under DDP every rank holds whole, identical gradients, so a norm or a dot product is a local computation. Under FSDP2
(Lightning's ``ModelParallelStrategy`` with ``fully_shard``) a parameter and its gradient are ``DTensor`` s of which
each rank holds a shard: a norm is the square root of a *sum over ranks* of local sums of squares. The traps:
``float()`` of a partial ``DTensor`` silently returns the local value, ``.tolist()`` raises, and mixing a ``DTensor``
with a plain tensor raises. The helpers here compute local float64 partial sums of the local shards, stacked into
one tensor, and sum them across ranks in one collective only when some tensor is sharded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["distribute_like", "full", "global_sums", "is_sharded", "local", "squared_norm"]

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - older torch has no public DTensor
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter or gradient of an FSDP2-sharded module)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """The rank's local shard of a ``DTensor`` (a view: in-place changes reach the ``DTensor``), else ``tensor``."""
    return cast(Any, tensor).to_local() if is_sharded(tensor) else tensor


def full(tensor: Tensor) -> Tensor:
    """The whole tensor: a ``DTensor`` is gathered (a collective: every rank must call it), a plain tensor returned."""
    return cast(Any, tensor).full_tensor() if is_sharded(tensor) else tensor


def squared_norm(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """The float64 sum of squares of the local shards of ``tensors`` (a 0-dim tensor on ``device``; 0 if empty)."""
    shards = [local(t).detach() for t in tensors]
    shards = [s for s in shards if s.numel()]
    if not shards:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack([n.double() for n in torch._foreach_norm(shards)]).square().sum()


def global_sums(trainer: pl.Trainer, values: Tensor, sharded: bool) -> list[float]:
    """``values`` (local partial sums) summed over ranks when ``sharded``, as floats: one collective, one copy."""
    if sharded and trainer.world_size > 1:
        values = trainer.strategy.reduce(values, reduce_op="sum")
    return values.tolist()


def distribute_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` (the whole tensor, identical on every rank) cut into ``like``'s shard, without communication.

    For a plain ``like`` it is ``full`` on ``like``'s device and dtype.
    """
    full = full.to(device=local(like).device, dtype=like.dtype)
    if not is_sharded(like):
        return full
    assert distribute_tensor is not None
    sharded: Any = like
    return distribute_tensor(full, sharded.device_mesh, sharded.placements, src_data_rank=None)
